"""Choosing the nouns of a prompt as default targets: an attnctl extension (the methods' papers are given targets).

The rule, whichever tagger is used: every maximal run of consecutive nouns (no punctuation between them) gives its
last word, the head ("a teddy bear" → bear, "a photo of a cat" → photo, cat). Words are split as
`PromptTokens.words` splits them, and a repeated word is returned as `dog#2`, `dog#3`, ... so that every result can
be passed to `PromptTokens.word_positions`.

Taggers:
- spaCy (`pip install attnctl[nlp]` and an English pipeline such as `python -m spacy download en_core_web_sm`), when
  it can be imported and a pipeline loaded: NOUN and PROPN tokens are nouns.
- otherwise a rule-based fallback: a word is a noun unless it is a function word (articles, determiners, numerals,
  pronouns, prepositions, conjunctions, auxiliaries), a spatial word (left, right, front, top, ...), a known
  adjective (colours, sizes, common descriptive words) or has an adjective ending (-ful, -ous, -ive, -less, -able,
  -ible, -ish after at least three letters), an adverb (-ly, bar a few nouns such as butterfly) or a participle
  (-ed; -ing unless it follows an article or determiner: "a painting" is a noun). It is right on the usual
  "a <adjectives> <noun> <preposition> a <adjectives> <noun>" prompts and can be wrong on others; pass targets then.
"""

from __future__ import annotations

from .text import english_pipeline
from .text import words as split_words

_DETERMINERS = set("""a an the this that these those some any each every no another other such its his her their my
your our all both either neither few many several much more most""".split())
_NUMBERS = set("""one two three four five six seven eight nine ten eleven twelve twenty hundred dozen single pair
couple first second third""".split())
_PRONOUNS = set("""i you he she it we they me him us them who whom whose which what something someone anything
nothing everything itself themselves""".split())
_PREPOSITIONS = set("""of in on at to with without by for from near next beside besides behind under underneath above
over below between among inside outside into onto upon across along around through against toward towards beneath
atop beyond within via like as off out up down about after before during""".split())
_CONJUNCTIONS = set("and or but nor while than then so yet plus whereas if".split())
_AUXILIARIES = set("""is are was were be been being am has have had having do does did can could will would shall
should may might must not very too also just there here""".split())
_SPATIAL = set("left right front back top bottom middle center centre side foreground".split())
_ADJECTIVES = set("""red green blue yellow orange purple pink brown black white gray grey golden silver violet cyan
magenta beige turquoise maroon navy teal big small large tiny huge little tall short long giant massive miniature
old young new ancient modern beautiful pretty cute ugly happy sad angry fluffy furry shiny dark bright light pale
wooden metallic plastic glass round square rectangular triangular wet dry hot cold warm cool fresh ripe empty full
soft hard smooth rough thick thin fat heavy sleek striped spotted realistic detailed high low wide narrow deep
open closed broken clean dirty colorful colourful vintage rustic cozy cosy fancy plain cartoon digital""".split())
_ADJECTIVE_ENDINGS = ("ful", "ous", "ive", "less", "able", "ible", "ish")
_NOUNS_ENDING_LY = set("butterfly dragonfly firefly fly lily belly jelly family bully ally rally holly assembly "
                       "italy july".split())
_NOUNS_ENDING_ED = set("bed shed sled sofa-bed flowerbed seabed".split())


def tagger_name() -> str:
    """The tagger `choose_nouns` uses by default: "spaCy" where an English pipeline loads, else "rule-based"."""
    return "spaCy" if english_pipeline() is not None else "rule-based"


def choose_nouns(prompt: str, tagger: str = "auto") -> list[str]:
    """The head nouns of `prompt` as word specs (`dog`, `dog#2` for the second 'dog'), in prompt order.
    `tagger`: "auto" (spaCy when available, else rules), "spacy" or "rules"."""
    words = split_words(prompt)
    if not words:
        return []
    nlp = english_pipeline() if tagger in ("auto", "spacy") else None
    if tagger == "spacy" and nlp is None:
        raise ImportError("spaCy with an English pipeline is not available: pip install 'attnctl[nlp]' and "
                          "python -m spacy download en_core_web_sm")
    flags = _spacy_flags(nlp, prompt, words) if nlp is not None else _rule_flags(words)
    heads = []
    for i, (_, _, end) in enumerate(words):
        if not flags[i]:
            continue
        nxt = i + 1
        if nxt < len(words) and flags[nxt] and not prompt[end:words[nxt][1]].strip():
            continue  # not the last noun of its run
        heads.append(i)
    counts: dict[str, int] = {}
    specs = []
    for i, (word, _, _) in enumerate(words):
        n = counts[word.lower()] = counts.get(word.lower(), 0) + 1
        if i in heads:
            specs.append(word if n == 1 else f"{word}#{n}")
    return specs


def _spacy_flags(nlp, prompt: str, words) -> list[bool]:
    doc = nlp(prompt)
    flags = []
    for _, start, end in words:
        tags = [t.pos_ for t in doc if t.idx < end and t.idx + len(t.text) > start]
        flags.append(bool(tags) and tags[-1] in ("NOUN", "PROPN"))
    return flags


def _rule_flags(words) -> list[bool]:
    lowered = [w.lower() for w, _, _ in words]
    flags = []
    for i, w in enumerate(lowered):
        previous = lowered[i - 1] if i else None
        following = lowered[i + 1] if i + 1 < len(lowered) else None
        flags.append(_is_noun(w, previous) or _adjective_used_as_noun(w, previous, following))
    return flags


def _adjective_used_as_noun(w: str, previous: str | None, following: str | None) -> bool:
    """'a blue square', 'a round': a word that can be an adjective, closing a noun phrase (after a determiner or an
    adjective, before the end, a conjunction or a preposition), is the phrase's noun. 'the sky is blue' is not."""
    if w not in _ADJECTIVES or previous is None:
        return False
    opens_phrase = previous in _DETERMINERS or previous in _NUMBERS or previous in _ADJECTIVES
    closes_phrase = following is None or following in _CONJUNCTIONS or following in _PREPOSITIONS \
        or following in _SPATIAL
    return opens_phrase and closes_phrase


def _is_noun(w: str, previous: str | None) -> bool:
    if w.isdigit() or any(c.isdigit() for c in w):
        return False
    if w in _DETERMINERS or w in _NUMBERS or w in _PRONOUNS or w in _PREPOSITIONS or w in _CONJUNCTIONS:
        return False
    if w in _AUXILIARIES or w in _SPATIAL or w in _ADJECTIVES:
        return False
    if w.endswith("'s") or "-" in w and w.rsplit("-", 1)[1] in ("colored", "coloured", "haired", "shaped", "sized"):
        return False
    if any(w.endswith(e) and len(w) - len(e) >= 3 for e in _ADJECTIVE_ENDINGS):
        return False
    if w.endswith("ly") and len(w) > 4 and w not in _NOUNS_ENDING_LY:
        return False
    if w.endswith("ed") and len(w) > 4 and w not in _NOUNS_ENDING_ED:
        return False
    if w.endswith("ing") and len(w) > 4:
        return previous in _DETERMINERS or previous in _ADJECTIVES or previous in _NUMBERS
    return True

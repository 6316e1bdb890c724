"""Token roles of a region's phrase: attribute words (modifiers of the head noun) and instance words (the rest).

AST tunes image→text attention towards different roles at different depths, so every instance phrase is split in two:
- attribute: adjective / compound / conjunct modifiers of the head noun of the phrase's first noun chunk, taken as the
  contiguous span from the first to the last such modifier ("a *fluffy white* cat", "a *teddy* bear");
- instance: every other word of the phrase (determiner, head noun, anything after it).
The background phrase has the background role as a whole.

Two ways to find the attribute span, chosen by `parser`:
- "spacy": a dependency parse with spaCy (the reference's way; `pip install attnctl[nlp]` and a model such as
  `python -m spacy download en_core_web_sm`);
- "rules": the built-in fallback, used when spaCy or its English model is not installed. The phrase's first chunk is
  the words before the first preposition or conjunction ("a red dog *with* a hat" → "a red dog"); its last word is the
  head noun; the words between the leading determiners / numbers / possessives and the head noun are the attribute.
  This matches the parse on the plain "det adj* noun+" phrases that layouts usually carry; for unusual phrases give
  the split explicitly (`"attribute": "red"` in the layout), which always wins.
- "auto" (default): spaCy when it loads, the rules otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .text import english_pipeline, words

ATTRIBUTE, INSTANCE, BACKGROUND = "attribute", "instance", "background"
ROLES = (INSTANCE, ATTRIBUTE, BACKGROUND)

_LEADING = {
    "a", "an", "the", "this", "that", "these", "those", "some", "many", "several", "few", "one", "two", "three",
    "four", "five", "six", "seven", "eight", "nine", "ten", "my", "your", "his", "her", "its", "our", "their", "no",
    "each", "every", "another", "other", "any", "all", "both",
}
_CHUNK_END = {
    "with", "of", "in", "on", "at", "by", "for", "from", "to", "under", "over", "above", "below", "behind", "beside",
    "near", "next", "inside", "outside", "into", "onto", "and", "or", "but", "while", "that", "which", "who",
    "holding", "wearing", "sitting", "standing", "lying", "is", "are", "was", "were", "between", "against", "across",
    "along", "around", "through", "beneath", "among", "like", "as",
}


PARSERS = ("auto", "spacy", "rules")  # how a phrase's attribute words are found


def attribute_spans(phrase: str, parser: str = "auto") -> list[tuple[int, int]]:
    """Character spans (within `phrase`) of its attribute words: one contiguous span, or none."""
    if parser not in PARSERS:
        raise UsageError(f"unknown role parser {parser!r}; use auto, spacy or rules")
    if parser in ("auto", "spacy"):
        nlp = english_pipeline()
        if nlp is not None:
            return _spacy_spans(nlp, phrase)
        if parser == "spacy":
            raise UsageError(
                "the spaCy role parser was asked for but spaCy or its English model is not installed: "
                "`pip install 'attnctl[nlp]' && python -m spacy download en_core_web_sm`, or use parser='rules', "
                "or give each region's attribute words explicitly in the layout"
            )
    return _rule_spans(phrase)


def parser_in_use(parser: str = "auto") -> str:
    """Which parser `attribute_spans(..., parser)` will use here: "spacy" or "rules"."""
    if parser == "rules":
        return "rules"
    return "spacy" if english_pipeline() is not None else "rules"


def explicit_spans(phrase: str, attribute: str | list[str], where: str) -> list[tuple[int, int]]:
    """Spans of user-given attribute words: each a verbatim part of `phrase` (first match, case-insensitive)."""
    words = [attribute] if isinstance(attribute, str) else list(attribute)
    spans, lowered = [], phrase.lower()
    for word in words:
        if not isinstance(word, str):
            raise UsageError(f"{where}: 'attribute' must be a string or a list of strings, got {word!r}")
        needle = word.strip().lower()
        if not needle:
            continue
        at = lowered.find(needle)
        if at < 0:
            raise UsageError(f"{where}: attribute {word!r} is not part of its phrase {phrase!r}")
        spans.append((at, at + len(needle)))
    return spans


def _rule_spans(phrase: str) -> list[tuple[int, int]]:
    chunk = []
    for word in words(phrase):
        if chunk and word[0].lower() in _CHUNK_END:
            break
        chunk.append(word)
    start = 0
    while start < len(chunk) and chunk[start][0].lower() in _LEADING:
        start += 1
    modifiers = chunk[start:-1]  # words between the leading determiners and the head noun
    if not modifiers:
        return []
    return [(modifiers[0][1], modifiers[-1][2])]


def _spacy_spans(nlp, phrase: str) -> list[tuple[int, int]]:
    doc = nlp(phrase)
    chunks = list(doc.noun_chunks)
    if not chunks:
        return []
    chunk = chunks[0]
    root = chunk.root
    modifiers = [t for t in chunk
                 if t.dep_ in ("amod", "conj", "compound") and t.head == root and t.pos_ in ("ADJ", "NOUN")]
    if not modifiers:
        return []
    return [(min(t.idx for t in modifiers), max(t.idx + len(t.text) for t in modifiers))]


Word = tuple[str, int, int]  # (word, start, end) in the prompt


@dataclass(frozen=True)
class BindingGroup:
    """A noun and the modifier words that describe it ("a *red shiny* circle"): what a binding method ties together."""

    modifiers: tuple[Word, ...]
    noun: Word


def binding_groups(prompt: str, parser: str = "auto") -> list[BindingGroup]:
    """Every noun of `prompt` that has modifiers, with them, in prompt order. spaCy's parse where it is installed
    (a noun's adjective / compound / noun-modifier children, and the conjuncts of those: "a red and blue ball"),
    the rules otherwise (in each chunk between chunk-ending words and punctuation, the words between its leading
    determiners and its last word, which is the noun)."""
    if parser not in PARSERS:
        raise UsageError(f"unknown role parser {parser!r}; use auto, spacy or rules")
    nlp = english_pipeline() if parser in ("auto", "spacy") else None
    if parser == "spacy" and nlp is None:
        raise UsageError("the spaCy role parser was asked for but spaCy or its English model is not installed: "
                         "`pip install 'attnctl[nlp]' && python -m spacy download en_core_web_sm`, or use "
                         "parser='rules', or name the groups explicitly")
    return _spacy_groups(nlp, prompt) if nlp is not None else _rule_groups(prompt)


def _rule_groups(prompt: str) -> list[BindingGroup]:
    groups, chunk = [], []
    for word in [*words(prompt), None]:
        punctuated = word is not None and chunk and prompt[chunk[-1][2]:word[1]].strip()  # "a, b", "a; b"
        if word is None or punctuated or word[0].lower() in _CHUNK_END:
            start = 0
            while start < len(chunk) and chunk[start][0].lower() in _LEADING:
                start += 1
            if len(chunk) - start >= 2:
                groups.append(BindingGroup(tuple(chunk[start:-1]), chunk[-1]))
            chunk = [word] if punctuated and word[0].lower() not in _CHUNK_END else []
        else:
            chunk.append(word)
    return groups


_MODIFIER_DEPS = ("amod", "compound", "nmod", "npadvmod", "advmod", "acomp")


def _spacy_groups(nlp, prompt: str) -> list[BindingGroup]:
    groups = []
    for token in nlp(prompt):
        if token.pos_ not in ("NOUN", "PROPN") or token.dep_ in _MODIFIER_DEPS:
            continue
        found, stack = [], [c for c in token.children if c.dep_ in _MODIFIER_DEPS]
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(c for c in node.children if c.dep_ in _MODIFIER_DEPS or c.dep_ == "conj")
        if found:
            found.sort(key=lambda t: t.idx)
            groups.append(BindingGroup(tuple((t.text, t.idx, t.idx + len(t.text)) for t in found),
                                       (token.text, token.idx, token.idx + len(token.text))))
    return groups


def object_phrase(prompt: str, noun: tuple[int, int]) -> tuple[int, int]:
    """The character span of the phrase that names the object whose noun is at `noun` (a character span): the noun
    and the words before it back to a chunk-ending word or punctuation ("a big red *circle* and ..." → "a big red
    circle"), determiners included."""
    before = [w for w in words(prompt) if w[2] <= noun[0]]
    start = noun[0]
    for word, at, end in reversed(before):
        if word.lower() in _CHUNK_END or prompt[end:start].strip():
            break
        start = at
    return start, noun[1]

"""Target words of the methods that take them (Regulation, Attend-and-Excite): the option's checks, the nouns chosen
when none are named, and the token positions per prompt."""

from __future__ import annotations

import logging

from ..config import word_list
from ..errors import UsageError
from ..text import phrase_spans
from ..tokens import parse_occurrence

log = logging.getLogger(__name__)

TARGETS_HELP = ("words of the prompt to act on (every sub-token of a word is a target; word#2 for a repeat), one "
                "list for all prompts or one list per prompt; None chooses each prompt's nouns (an attnctl extension)")


def normalise_targets(targets):
    """None, a list of words for every prompt, or one list per prompt; a UsageError for anything else."""
    if targets is None:
        return None
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, (list, tuple)) for t in targets):
        per_prompt = [word_list(t, "targets (one list of words per prompt)") for t in targets]
        if not all(per_prompt):
            raise UsageError("targets has an empty list of words for a prompt: name at least one word of each prompt")
        return [[x.strip() for x in t] for t in per_prompt]
    words = word_list(targets, "targets")
    if not words:
        raise UsageError("targets is empty: name at least one word of the prompt, or pass targets=None to choose "
                         "the prompt's nouns")
    return [t.strip() for t in words]


def one_target_list(targets, method: str):
    """`normalise_targets(targets)` where it is None or one list of words for every prompt; a UsageError naming
    `method` for one list per prompt."""
    targets = normalise_targets(targets)
    if targets is not None and not isinstance(targets[0], str):
        raise UsageError(f"{method} takes one list of target nouns for every prompt")
    return targets


def choose_targets(prompt: str, method: str = "Regulation") -> list[str]:
    """The nouns of `prompt` as a method's targets (an attnctl extension: the papers' methods are given them)."""
    from ..nouns import choose_nouns, tagger_name

    words = choose_nouns(prompt)
    if not words:
        raise UsageError(f"no nouns found in the prompt {prompt!r}; name the targets (targets=[...] or "
                         "--targets w1,w2)")
    log.info("%s targets for %r: %s (nouns chosen by the %s tagger: an attnctl extension, the paper's method is "
             "given targets; set them with targets=[...] or --targets)", method, prompt, ", ".join(words),
             tagger_name())
    return words


def targets_per_prompt(targets, prompts, method: str) -> list[list[str]]:
    """The target words of each prompt (`prompts`: PromptTokens) from a normalised `targets` option."""
    if targets is None:
        return [choose_targets(p.prompt, method) for p in prompts]
    if isinstance(targets[0], str):
        return [list(targets)] * len(prompts)
    if len(targets) != len(prompts):
        raise UsageError(f"targets were given for {len(targets)} prompts but the batch has {len(prompts)} prompts; "
                         "give one list for all prompts or one per prompt")
    return [list(t) for t in targets]


def target_positions(prompt, words: list[str]) -> list[int]:
    """Token positions of `words` in `prompt` (PromptTokens), each once, in order; a UsageError listing the prompt's
    tokens for a word it lacks."""
    positions: list[int] = []
    for word in words:
        for p in prompt.word_positions(word):
            if p not in positions:
                positions.append(p)
    return positions


def noun_span(prompt: str, noun: str, who: str) -> tuple[int, int]:
    """The character span of target `noun` (`word` or `word#n`, the n-th appearance) in `prompt`; `who` names the
    method in the refusal."""
    word, occurrence = parse_occurrence(noun)
    found = phrase_spans(prompt, word)
    if len(found) < occurrence:
        often = "" if occurrence == 1 else f" {occurrence} times"
        raise UsageError(f"{who}: {word!r} is not a word of the prompt {prompt!r}{often}; name the objects' "
                         "nouns as the prompt writes them (--targets)")
    return found[occurrence - 1]


def object_nouns(session, targets, who: str) -> tuple[str, list[tuple[int, int]]]:
    """The session's one prompt and the character spans of its objects' nouns (`targets`, default the prompt's
    nouns): a UsageError without one prompt or with fewer than two objects (methods that compare objects)."""
    if len(session.prompts) != 1:
        raise UsageError(f"{who} needs the prompt, one string: pass prompt=\"...\" to attnctl.apply")
    prompt = session.prompts[0].prompt
    nouns = targets_per_prompt(targets, session.prompts, who)[0]
    if len(nouns) < 2:
        raise UsageError(f"{who} compares the objects of the prompt, so it needs two or more; found {nouns} in "
                         f"{prompt!r}: name the objects' nouns with targets=[...] (--targets)")
    return prompt, [noun_span(prompt, noun, who) for noun in nouns]

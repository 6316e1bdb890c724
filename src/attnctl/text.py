"""Prompt text helpers shared by `tokens`, `roles`, `nouns` and `layout`: how a prompt splits into words, where a
phrase appears in it, and the optional spaCy English pipeline.

>>> words("a red-haired girl's cat")
[('a', 0, 1), ('red-haired', 2, 12), ("girl's", 13, 19), ('cat', 20, 23)]
>>> phrase_spans("A dog and a dog", " a DOG")
[(0, 5), (10, 15)]
>>> phrase_spans("a cat, cats and a category", "cat")
[(2, 5)]
"""

from __future__ import annotations

import os
import re
from functools import cache

#: A word: a run of letters, digits, underscores, apostrophes and hyphens ("red-haired", "girl's").
WORD = re.compile(r"[\w'-]+")

#: spaCy's English pipelines, tried in this order (the small one first).
SPACY_ENGLISH = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")


def words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) for every word of `text`, in order."""
    return [(m.group(0), m.start(), m.end()) for m in WORD.finditer(text)]


def phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of every appearance of `phrase` (stripped) in `text` as whole words, case-insensitive,
    overlapping ones included, in order; none for an empty phrase.

    Whole words: an appearance must not start or end inside a word of `text` (a word as `WORD` reads it), so "cat"
    is found in "a cat." and "Cat, sat" but not in "category", "cats", "tomcat", "cat's" or "cat-like"."""
    lowered, needle = text.lower(), phrase.strip().lower()
    spans, at = [], lowered.find(needle)
    while needle and at >= 0:
        end = at + len(needle)
        if not _inside_word(lowered, at) and not _inside_word(lowered, end):
            spans.append((at, end))
        at = lowered.find(needle, at + 1)
    return spans


def _inside_word(text: str, at: int) -> bool:
    """Whether position `at` (between two characters) of `text` splits a word."""
    return 0 < at < len(text) and bool(WORD.fullmatch(text[at - 1])) and bool(WORD.fullmatch(text[at]))


def english_pipeline():
    """The first of `SPACY_ENGLISH` that loads, or None when spaCy is not installed, none of them loads, or the
    environment variable ATTNCTL_NO_SPACY is set (then callers use their rule-based fallbacks)."""
    if os.environ.get("ATTNCTL_NO_SPACY"):
        return None
    for name in SPACY_ENGLISH:
        nlp = load_spacy(name)
        if nlp is not None:
            return nlp
    return None


@cache
def load_spacy(name: str):
    """The spaCy pipeline `name`, loaded once per name; None when spaCy is not installed or the pipeline does not
    load (not installed, or built for another spaCy version)."""
    try:
        import spacy
    except ImportError:
        return None
    try:
        return spacy.load(name)
    except (OSError, ImportError, ValueError):
        return None

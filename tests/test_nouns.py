"""Choosing targets when none are given (an attnctl extension): the rule-based fallback, word specs that
`PromptTokens.word_positions` accepts, and spaCy used when present."""

import sys
import types

import pytest

from attnctl import nouns, text
from attnctl.offline_tokenizers import clip_tokenizer
from attnctl.tokens import PromptTokens, TextSegment


@pytest.mark.parametrize("prompt, expected", [
    ("a cat and a dog", ["cat", "dog"]),
    ("a red car and a white sheep", ["car", "sheep"]),
    ("A painting of an elephant with glasses", ["painting", "elephant", "glasses"]),
    ("a teddy bear sitting on a wooden chair", ["bear", "chair"]),  # head of a compound; -ing after a noun: verb
    ("two beautiful horses running quickly in front of a tall building", ["horses", "building"]),
    ("a dog, a dog and a cat.", ["dog", "dog#2", "cat"]),  # punctuation ends a run; repeats numbered
    ("a photo of a butterfly on a flower", ["photo", "butterfly", "flower"]),
    ("the blue one", []),
])
def test_rule_based_fallback(prompt, expected):
    assert nouns.choose_nouns(prompt, tagger="rules") == expected


def test_specs_resolve_to_token_positions():
    prompt = "a dog chasing a dog and a cat"
    tokens = PromptTokens(prompt, [TextSegment(clip_tokenizer(), 0, 77)])
    specs = nouns.choose_nouns(prompt, tagger="rules")
    assert specs == ["dog", "dog#2", "cat"]
    assert [tokens.word_positions(s) for s in specs] == [[2], [5], [8]]


def test_spacy_used_when_available(monkeypatch):
    """With a (stub) spaCy pipeline the tags come from it: NOUN/PROPN, last of each run."""

    class Tok:
        def __init__(self, text, idx, pos):
            self.text, self.idx, self.pos_ = text, idx, pos

    def nlp(text):
        tags = {"a": "DET", "dog": "NOUN", "house": "NOUN", "near": "ADP", "Paris": "PROPN", "in": "ADP",
                "red": "ADJ"}
        out, at = [], 0
        for word in text.split():
            at = text.index(word, at)
            out.append(Tok(word, at, tags.get(word, "X")))
            at += len(word)
        return out

    monkeypatch.setattr(nouns, "english_pipeline", lambda: nlp)
    assert nouns.tagger_name() == "spaCy"
    assert nouns.choose_nouns("a red dog house near Paris") == ["house", "Paris"]
    assert nouns.choose_nouns("a red dog house near Paris", tagger="rules") == ["house", "Paris"]


def test_fallback_when_spacy_missing(monkeypatch):
    text.load_spacy.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # import fails
    try:
        assert nouns.tagger_name() == "rule-based"
        assert nouns.choose_nouns("a cat and a dog") == ["cat", "dog"]
        with pytest.raises(ImportError, match="attnctl\\[nlp\\]"):
            nouns.choose_nouns("a cat", tagger="spacy")
    finally:
        text.load_spacy.cache_clear()


def test_fallback_when_spacy_has_no_english_pipeline(monkeypatch):
    def load(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'")

    text.load_spacy.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    try:
        assert nouns.tagger_name() == "rule-based"
    finally:
        text.load_spacy.cache_clear()


def test_adjective_closing_a_noun_phrase_is_its_noun():
    assert nouns.choose_nouns("a red circle and a blue square", tagger="rules") == ["circle", "square"]
    assert nouns.choose_nouns("a red circle to the left of a blue square", tagger="rules") == ["circle", "square"]
    assert nouns.choose_nouns("a square table", tagger="rules") == ["table"]
    assert nouns.choose_nouns("the sky is blue", tagger="rules") == ["sky"]

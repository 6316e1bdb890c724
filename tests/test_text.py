"""Prompt text helpers: the word split, phrase search and the spaCy loader shared by tokens, roles and nouns."""

import sys
import types

from attnctl import nouns, roles, text


def test_words_and_phrase_spans():
    assert text.words("a red-haired girl's cat") == [("a", 0, 1), ("red-haired", 2, 12), ("girl's", 13, 19),
                                                      ("cat", 20, 23)]
    assert text.phrase_spans("A dog and a dog", " a DOG") == [(0, 5), (10, 15)]
    assert text.phrase_spans("a dog a dog a dog", "a dog a dog") == [(0, 11), (6, 17)]  # overlapping ones count
    assert text.phrase_spans("a dog", "  ") == []


def test_phrases_match_whole_words_only():
    assert text.phrase_spans("a category of dogs", "cat") == []
    assert text.phrase_spans("a cat.", "cat") == [(2, 5)]
    assert text.phrase_spans("A Cat sat", "cat") == [(2, 5)]  # case-insensitive
    for other in ("cats", "tomcat", "cat's toy", "cat-like", "bobcat_2"):
        assert text.phrase_spans(other, "cat") == [], other
    assert text.phrase_spans("a category and a cat", "cat") == [(17, 20)]
    assert text.phrase_spans("a bigcat, a big cat", "big cat") == [(12, 19)]
    assert text.phrase_spans("a dog, then", "dog,") == [(2, 6)]  # a phrase ending in punctuation
    assert text.phrase_spans("aaa", "aa") == []


def test_spacy_loader_falls_back_by_name_and_loads_each_once(monkeypatch):
    loads = []

    def load(name, **kwargs):
        loads.append(name)
        if name == "en_core_web_sm":
            raise OSError(f"[E050] Can't find model '{name}'")
        return f"pipeline {name}"

    text.load_spacy.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    monkeypatch.delenv("ATTNCTL_NO_SPACY", raising=False)
    try:
        assert text.english_pipeline() == "pipeline en_core_web_md"
        assert nouns.tagger_name() == "spaCy" and roles.parser_in_use() == "spacy"  # one loader for both
        assert loads == ["en_core_web_sm", "en_core_web_md"]
        monkeypatch.setenv("ATTNCTL_NO_SPACY", "1")
        assert text.english_pipeline() is None
        assert nouns.tagger_name() == "rule-based" and roles.parser_in_use() == "rules"
    finally:
        text.load_spacy.cache_clear()

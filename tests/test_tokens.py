import warnings

import pytest

from attnctl import UsageError
from attnctl.offline_tokenizers import clip_tokenizer, t5_like_tokenizer
from attnctl.tokens import PromptTokens, TextSegment


def clip_tokens(prompt):
    tok = clip_tokenizer()
    return PromptTokens(prompt, [TextSegment(tok, 0, 77)])


def test_offline_clip_tokenizer_matches_stable_diffusion():
    ids = clip_tokenizer()("a painting of an elephant with glasses").input_ids
    assert ids == [49406, 320, 3086, 539, 550, 10299, 593, 6116, 49407]


def test_word_positions_cover_every_subtoken():
    pt = clip_tokens("a photo of an astronaut riding a horse")
    tok = clip_tokenizer()
    ids = tok("a photo of an astronaut riding a horse").input_ids
    positions = pt.word_positions("astronaut")
    pieces = tok.convert_ids_to_tokens([ids[p] for p in positions])
    assert "".join(pieces).replace("</w>", "") == "astronaut"
    assert pt.word_positions("horse") == [len(ids) - 2]


def test_repeated_word_by_occurrence():
    pt = clip_tokens("a dog chasing a cat and a dog")
    assert pt.word_positions("dog") == [2]
    assert pt.word_positions("dog#2") == [8]
    with pytest.raises(UsageError, match="occurrence 3"):
        pt.word_positions("dog#3")


def test_missing_word_lists_the_prompt_tokens():
    pt = clip_tokens("a red cube")
    with pytest.raises(UsageError) as err:
        pt.word_positions("sphere")
    assert "'sphere'" in str(err.value) and "a red cube" in str(err.value) and "red" in str(err.value)


def test_segments_offset_positions():
    t5 = t5_like_tokenizer()
    pt = PromptTokens("a red cat", [TextSegment(clip_tokenizer(), 0, 77), TextSegment(t5, 77, 256)])
    # CLIP: <sot> a red cat <eot> -> red at 2; T5: ▁a ▁red ▁cat </s> -> red at 77 + 1
    assert pt.word_positions("red") == [2, 78]


def test_long_prompt_warns_and_cut_words_raise():
    prompt = " ".join(["word"] * 80) + " zebra"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pt = clip_tokens(prompt)
    assert any("cut" in str(w.message) and "zebra" in str(w.message) for w in caught)
    with pytest.raises(UsageError, match="cut"):
        pt.word_positions("zebra")
    assert pt.word_positions("word") == [1]


def test_words_and_phrases_are_found_as_whole_words_only():
    pt = clip_tokens("a category of dogs")
    for find in (pt.word_positions, pt.phrase_positions):
        with pytest.raises(UsageError, match="'cat' is not in the prompt"):
            find("cat")
    pt = clip_tokens("a category and a cat.")
    assert pt.word_positions("cat") == pt.phrase_positions("cat") == [5]  # <sot> a category and a cat
    with pytest.raises(UsageError, match="'cat' is not in the prompt"):
        clip_tokens("two cats").phrase_positions("cat")


@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_are_those_of_the_padded_sequence_the_pipeline_feeds(side):
    """Kolors' tokenizer pads on the left: the prompt's tokens sit at the end of the sequence, not at its start."""
    tok = clip_tokenizer()
    tok.padding_side = side
    prompt = "a red dog and a grey cat"
    padded = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    pt = PromptTokens(prompt, [TextSegment(tok, 0, 77)])
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    assert pt.word_positions("dog") == [padded.index(dog)]
    assert pt.word_positions("cat") == [padded.index(tok("cat", add_special_tokens=False).input_ids[0])]
    start = padded.index(tok.bos_token_id)
    assert padded[start + 8] == tok.eos_token_id and pt.end_of_text == start + 8  # <start>, 7 words, <end>
    assert start == (0 if side == "right" else 77 - 9)


class WithoutOffsets:
    """A tokenizer that cannot give character offsets (a slow, Python tokenizer), standing in with a fast one's
    tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("make", [clip_tokenizer, t5_like_tokenizer], ids=["CLIP", "T5"])
def test_tokenizers_without_offsets_find_the_same_positions(make):
    prompt = "a photo of an astronaut riding a horse near a red barn"
    fast, slow = (PromptTokens(prompt, [TextSegment(t, 0, 77)]) for t in (make(), WithoutOffsets(make())))
    for word in ("astronaut", "horse", "red", "barn", "a#3"):
        assert slow.word_positions(word) == fast.word_positions(word)

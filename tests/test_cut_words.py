"""Words that a short max_sequence_length cuts from the prompt: an error naming the word, its position, the limit and
the fix when the word was asked for; a logged warning (and an empty map) when it was chosen automatically."""

import logging

import pytest
import torch

import attnctl
from attnctl.offline_tokenizers import clip_tokenizer, t5_like_tokenizer
from attnctl.tokens import PromptTokens, TextSegment

from conftest import call_kwargs, run, tiny_pipe

# T5: ▁a ▁cat ▁and ▁a ▁dog ▁sitting ▁on ▁the ▁grass ... ▁with ▁a ▁bird </s>; cut to 8 it keeps "a cat and a dog
# sitting on" and puts its end token at position 7
PROMPT = "a cat and a dog sitting on the grass near a big red barn with a bird"


def t5_tokens():
    return PromptTokens(PROMPT, [TextSegment(t5_like_tokenizer(), 0, 512)])


def test_a_requested_word_beyond_the_limit_is_an_error_naming_it_its_position_and_the_fix():
    tokens = t5_tokens()
    assert tokens.held("on", tokens.word_positions("on"), 8) == [6]
    assert tokens.held("bird", tokens.word_positions("bird"), 512) == [19]  # not cut
    with pytest.raises(attnctl.UsageError) as err:
        tokens.held("the", tokens.word_positions("the"), 8)  # position 7 holds the end token once cut
    assert str(err.value) == (
        "'the' is at token position 7 (counting from 0) of the prompt, beyond the limit of 8 text "
        "tokens (max_sequence_length, the end token included), so the model never sees it; raise "
        "--max-sequence-length (max_sequence_length) to at least 9, or shorten the prompt")
    with pytest.raises(attnctl.UsageError, match="'bird' is at token position 19 .* limit of 8 .* at least 21"):
        tokens.held("bird", tokens.word_positions("bird"), 8)


def test_an_automatic_word_beyond_the_limit_is_a_warning(caplog):
    tokens = t5_tokens()
    with caplog.at_level(logging.WARNING, logger="attnctl"):
        assert tokens.held("bird", [19], 8, requested=False) == []
    assert [r.getMessage() for r in caplog.records] == [
        "'bird' is at token position 19 (counting from 0) of the prompt, beyond the limit of 8 text "
        "tokens (max_sequence_length, the end token included), so the model never sees it; its map is empty"]


def test_sd3_positions_are_counted_in_the_t5_tokens():
    tokens = PromptTokens(PROMPT, [TextSegment(clip_tokenizer(), 0, 77), TextSegment(t5_like_tokenizer(), 77, 256)])
    positions = tokens.word_positions("bird")
    assert positions[-1] == 77 + 19
    with pytest.raises(attnctl.UsageError, match="'bird' is at token position 19 .* limit of 8 text tokens"):
        tokens.held("bird", positions, 77 + 8)
    assert tokens.held("bird", positions, 77 + 8, requested=False) == positions[:-1]  # its CLIP tokens stay
    assert tokens.held("bird", positions, 77 + 256) == positions


def test_capture_of_a_cut_word(caplog):
    pipe = tiny_pipe("flux")
    kwargs = call_kwargs("flux", steps=1, max_sequence_length=8)
    with pytest.raises(attnctl.UsageError, match="'bird' is at token position 19 .* limit of 8"):
        with attnctl.apply(pipe, attnctl.Capture(["cat", "bird"]), prompt=PROMPT):
            run(pipe, PROMPT, **kwargs)
    capture = attnctl.Capture(["cat", "bird"], requested=False)
    with caplog.at_level(logging.WARNING, logger="attnctl"):
        with attnctl.apply(pipe, capture, prompt=PROMPT):
            run(pipe, PROMPT, **kwargs)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("attnctl")]
    assert len(ours) == 1 and ours[0].startswith("'bird' is at token position 19") and "its map is empty" in ours[0]
    for maps in capture.maps().values():
        assert maps[:, 0].min() > 0 and torch.count_nonzero(maps[:, 1]) == 0


def test_cli_maps_refuses_a_cut_word(tmp_path, cli):
    base = ["maps", "--model", "random:flux-tiny", "--prompt", PROMPT, "--steps", "1", "--height", "64", "--width",
            "64", "--max-sequence-length", "8", "--out", tmp_path]
    code, out, err = cli(*base, "--words", "cat,bird")
    assert code == 2 and "attnctl: error: 'bird' is at token position 19" in err
    assert "limit of 8 text tokens" in err and "raise --max-sequence-length" in err and "shorten the prompt" in err
    code, out, err = cli(*base, "--words", "cat,on")
    assert code == 0, err


def test_analysis_observers_of_a_cut_word(caplog):
    """TargetCoverage (words asked for) refuses a cut word; the hierarchy analysis (roles found by a parser) warns
    and leaves the cut tokens out, as Capture does."""
    from attnctl.analysis import Hierarchy, TargetCoverage

    pipe = tiny_pipe("flux")
    kwargs = call_kwargs("flux", steps=1, max_sequence_length=8)
    with pytest.raises(attnctl.UsageError, match="'bird' is at token position 19 .* limit of 8"):
        with attnctl.apply(pipe, TargetCoverage(["cat", "bird"]), prompt=PROMPT):
            run(pipe, PROMPT, **kwargs)
    layout = {"prompt": PROMPT, "background": "",
              "regions": [{"phrase": "a cat", "box": [0, 0, 0.5, 1]}, {"phrase": "a bird", "box": [0.5, 0, 1, 1]}]}
    hierarchy = Hierarchy(layout, role_parser="rules")
    with caplog.at_level(logging.WARNING, logger="attnctl"), attnctl.apply(pipe, hierarchy, prompt=PROMPT):
        run(pipe, PROMPT, **kwargs)
    warned = {r.getMessage() for r in caplog.records}
    assert any(m.startswith("'instance tokens of a bird' is at token position 1") for m in warned), warned
    assert {r["role"] for r in hierarchy.rows} >= {"instance"}  # the cat's rows are still recorded


def test_ast_does_not_take_the_end_token_for_a_phrase_token():
    """With max_sequence_length 5, position 4 holds the end token, not "dog" (its token position in the prompt): the
    region's phrase is wholly cut, which is an error, not a region tuned towards the end token."""
    pipe = tiny_pipe("flux")
    layout = {"prompt": PROMPT, "regions": [{"phrase": "cat", "box": [0, 0, 0.5, 1]},
                                            {"phrase": "dog", "box": [0.5, 0, 1, 1]}]}
    with pytest.raises(attnctl.UsageError, match=r"region 2 \('dog'\) lies beyond the 5 text tokens"):
        with attnctl.apply(pipe, attnctl.AST(layout)):
            run(pipe, PROMPT, **call_kwargs("flux", steps=1, max_sequence_length=5))


def test_a_tokenizer_without_an_end_token_keeps_a_prompt_token_last():
    """Gemma (Sana) starts the text with a start token and adds no end token: a sequence cut to n tokens holds the
    prompt's tokens up to position n - 1."""
    from test_family_support import gemma_like_tokenizer

    tokens = PromptTokens("a dog runs", [TextSegment(gemma_like_tokenizer(), 0, 8192, padding_side="right")])
    assert tokens.word_positions("dog") == [3, 4, 5]  # <bos> a Ġ d o g Ġ r u n s: one token per byte
    assert tokens.start_of_text == 0 and tokens.end_of_text is None
    assert tokens.held("dog", [3, 4, 5], 6) == [3, 4, 5]
    with pytest.raises(attnctl.UsageError, match="'dog' is at token position 5 .* limit of 5 text tokens"):
        tokens.held("dog", [3, 4, 5], 5)

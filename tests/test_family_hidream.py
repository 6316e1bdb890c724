"""HiDream-I1 (HiDreamImagePipeline): one sequence [image; image pads; T5; Llama; Llama] per block, double-stream then
single-stream blocks, CLIP giving only a pooled vector, classifier-free guidance batched [negative, prompt]: exact
capture (also with a non-square image's zeroed pad keys), words where T5's and Llama's tokenizations put them, the
methods that read joint attention, and the bad inputs refused before any step. A tiny random pipeline, built
offline."""

import functools
import warnings

import pytest
import torch

import attnctl
from attnctl import AST, Capture, UsageError
from test_family_flux2 import LAYOUT, PROMPT, Probe
from test_family_zimage import processors

CALL = dict(height=64, width=64)  # the tiny pipeline's area: 4x4 image tokens, then 128 T5 and 2 x 128 Llama tokens
WIDE = dict(height=48, width=96)  # scaled to 32x80: 2x5 tokens, padded to the model's 16 (max_resolution 8x8)
N_TEXT = 128 + 2 * 128
WORKS = {"ast", "layout-modulation", "relocation"}  # the methods that act here (the support matrix's row)


@functools.cache
def hidream():
    """random:hidream-tiny."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline("random:hidream-tiny")


def run(pipe, prompt=PROMPT, steps=2, call=CALL, **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                output_type="latent", **{**call, **extra}).images


def first_ids(encoder, action):
    """The input ids of `encoder`'s first call while `action` runs (the prompt's, before the negative's)."""
    seen = []
    spy = encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("input_ids", a[0] if a else None)),
                                            with_kwargs=True)
    try:
        action()
    finally:
        spy.remove()
    return seen[0]


@pytest.mark.parametrize("call, n_image, grid", [(CALL, 16, (4, 4)), (WIDE, 16, (2, 5))], ids=["square", "padded"])
def test_capture_is_exact_and_the_maps_are_the_joint_softmax(call, n_image, grid):
    """Bit for bit the plain pipeline's latents; every map the float64 softmax over the whole sequence, its
    image→text part: the image first (a non-square one padded to 16 tokens whose pad keys the model zeroes), the 384
    text tokens last, at double- and single-stream sites; the prompt's row is the second ([negative, prompt])."""
    pipe = hidream()
    before = processors(pipe.transformer)
    plain = run(pipe, call=call)
    probe, capture = Probe(), Capture(["dog", "cat"])
    with attnctl.apply(pipe, capture, probe, prompt=PROMPT):
        image = run(pipe, call=call)
    assert torch.equal(image, plain)
    assert processors(pipe.transformer) == before
    assert [c["site"] for c in probe.calls[:4]] == [
        "double_stream_blocks.0.block.attn1", "double_stream_blocks.1.block.attn1",
        "single_stream_blocks.0.block.attn1", "single_stream_blocks.1.block.attn1"]
    assert len(probe.calls) == 8
    for c in probe.calls:
        assert c["k"].shape[2] == n_image + N_TEXT and c["q"].shape[0] == 2
        assert c["text"] == slice(n_image, n_image + N_TEXT) and c["image"] == slice(0, grid[0] * grid[1])
        assert c["rows"] == slice(1, 2) and c["bias"] is None
        logits = (c["q"].double() @ c["k"].double().transpose(-1, -2)) * c["scale"]
        exact = torch.softmax(logits, dim=-1)[:, :, c["image"], c["text"]]
        assert (c["probs"].double() - exact).abs().max() < 1e-6
        if n_image > grid[0] * grid[1]:  # the pad tokens' keys are zero: their logits are 0
            assert bool((c["k"][:, :, grid[0] * grid[1]:n_image] == 0).all())
    assert {tuple(m.shape) for m in capture.maps().values()} == {(1, 2, *grid)}


def test_without_guidance_the_one_row_is_the_prompts():
    pipe = hidream()
    probe = Probe()
    with attnctl.apply(pipe, probe, prompt=PROMPT):
        run(pipe, steps=1, guidance_scale=1.0)
    assert {(c["q"].shape[0], c["rows"].start, c["rows"].stop) for c in probe.calls} == {(1, 0, 1)}


def test_words_sit_where_t5_and_llama_put_them():
    """The session's positions of "dog": one in T5's ids (no start token, </s> after the prompt), one in each of the
    two Llama copies (after <|begin_of_text|>), all holding dog's token among the ids each encoder is given."""
    pipe = hidream()
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
        t5 = first_ids(pipe.text_encoder_3, lambda: run(pipe, steps=1))[0]
        llama = first_ids(pipe.text_encoder_4, lambda: run(pipe, steps=1))[0]
        positions = session.prompts[0].word_positions("dog")
    assert len(t5) == len(llama) == 128 and len(positions) == 3
    p5, p4, p4_again = positions
    assert p4 - 128 == p4_again - 256 and p5 < 128 <= p4 < 256 <= p4_again
    assert pipe.tokenizer_3.decode(t5[p5]).strip() == "dog"
    assert pipe.tokenizer_4.decode(llama[p4 - 128]).strip() == "dog"
    assert pipe.tokenizer_3.decode(t5[:p5]) == "a red"
    assert pipe.tokenizer_4.decode(llama[:p4 - 128]) == "<|begin_of_text|>a red"
    eot = pipe.tokenizer_4.convert_tokens_to_ids("<|eot_id|>")
    assert bool((llama[9:] == eot).all())  # <|begin_of_text|>, 7 words, then the end-of-turn token as padding


def test_ast_changes_the_image():
    pipe = hidream()
    plain = run(pipe)
    with attnctl.apply(pipe, AST(LAYOUT)):
        assert (run(pipe) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("length", [64, 200])
def test_another_max_sequence_length_is_refused_before_any_step(length):
    """The Llama tokens follow T5's: at another length every Llama word moves, so the call is refused naming the
    length words are placed for."""
    pipe = hidream()
    probe = Probe()
    with pytest.raises(UsageError, match=f"{length} T5 and {length} Llama tokens .* max_sequence_length=128"):
        with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
            run(pipe, max_sequence_length=length)
    assert not probe.calls


def test_a_word_cut_by_max_sequence_length_is_refused_before_anything_runs():
    """A prompt of more than 128 tokens: T5 keeps 127 of its words and </s>, Llama <|begin_of_text|> and 127; a
    target word past them is refused as apply is entered, naming the fix; an earlier word works (with a warning
    naming what was cut)."""
    pipe = hidream()
    long = " ".join(["a red dog"] * 43) + " and a grey cat"  # 129 words, "cat" the last
    before = processors(pipe.transformer)
    with pytest.warns(UserWarning, match="longer than the text encoder's limit of 128 tokens"):
        with pytest.raises(UsageError, match="'cat' lies beyond the text encoder's token limit .*shorten the prompt"):
            with attnctl.apply(pipe, Capture(["cat"]), prompt=long):
                pytest.fail("entered")
    assert processors(pipe.transformer) == before
    with pytest.warns(UserWarning, match="this part was cut"):
        with attnctl.apply(pipe, Capture(["dog"]), prompt=long) as session:
            assert session.prompts[0].word_positions("dog") == [2, 131, 259]


@pytest.mark.parametrize("extra, which", [(dict(prompt_3="a red dog and a grey bird"), "T5"),
                                          (dict(prompt_4="a red dog and a grey bird"), "Llama"),
                                          (dict(prompt="a red dog and a grey bird"), "T5")])
def test_another_prompt_for_either_encoder_is_refused(extra, which):
    pipe = hidream()
    probe = Probe()
    with pytest.raises(UsageError, match=f"gave its {which} .* which is not the prompt attnctl.apply was given"):
        with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
            run(pipe, **{"prompt": PROMPT, **extra})
    assert not probe.calls


def test_the_half_head_rotary_branch_is_exact():
    """A transformer whose rotary width is half its head (diffusers rotates the first half only) is reproduced bit
    for bit too."""
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    base = hidream()
    torch.manual_seed(1)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=0, axes_dims_rope=(4, 2, 2),
        max_resolution=(8, 8), llama_layers=[0, 1]).eval()
    pipe = HiDreamImagePipeline(**{**base.components, "transformer": transformer})
    pipe.default_sample_size = base.default_sample_size
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe, steps=1)
    probe = Probe()
    with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
        image = run(pipe, steps=1)
    assert torch.equal(image, plain) and len(probe.calls) == 2


def test_an_unknown_processor_is_refused_naming_the_remedy():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = hidream()
    attn = pipe.transformer.double_stream_blocks[0].block.attn1
    saved = attn.processor
    attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(UsageError, match="AttnProcessor2_0, which attnctl cannot reproduce exactly .*"
                                             "HiDreamAttnProcessor.*custom processor"):
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pass
    finally:
        attn.set_processor(saved)


def test_sites_and_specs():
    from attnctl.models import check_spec

    sites = attnctl.sites_of(hidream())
    assert [(s.name, s.kind, s.stage, s.text_first) for s in sites] == [
        ("double_stream_blocks.0.block.attn1", "joint", "double", False),
        ("double_stream_blocks.1.block.attn1", "joint", "double", False),
        ("single_stream_blocks.0.block.attn1", "joint", "single", False),
        ("single_stream_blocks.1.block.attn1", "joint", "single", False)]
    assert check_spec("random:hidream?double=2&single=4") == {"double": 2, "single": 4}
    assert check_spec("random:hidream-tiny") == {}
    with pytest.raises(UsageError, match="takes double, single"):
        check_spec("random:hidream?layers=4")

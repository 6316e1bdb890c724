"""FLUX.2 ([dev]: Flux2Pipeline, Mistral 3 text after a system message, padded on the left here; [klein]:
Flux2KleinPipeline, Qwen3 text, padded on the right, classifier-free guidance as a second call): exact capture, words
where the pipeline's chat template puts them, the methods that read joint attention, and the bad inputs refused
before any step. Tiny random pipelines, built offline."""

import functools
import warnings

import pytest
import torch

import attnctl
from attnctl import AST, Capture, UsageError

PROMPT = "a red dog and a grey cat"
LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
# the methods' layout: a box where the random models' dog does not form on its own (relocation moves nothing when the
# object's window is its box already)
CORNER = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0.5, 0.5, 1, 1]}]}
DEV_CALL = dict(height=64, width=64, max_sequence_length=512)  # the [dev] tokenizer here pads on the left
KLEIN_CALL = dict(height=64, width=64, max_sequence_length=96, guidance_scale=4.0)


@functools.cache
def flux2_dev():
    """random:flux2-tiny: Flux2Pipeline with a tiny Mistral 3 encoder of 30 layers (it reads layers 10, 20, 30)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline("random:flux2-tiny")


@functools.cache
def flux2_klein():
    """random:flux2-klein-tiny: Flux2KleinPipeline with a tiny Qwen3 encoder (undistilled: it guides)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline("random:flux2-klein-tiny")


PIPES = {"dev": (flux2_dev, DEV_CALL), "klein": (flux2_klein, KLEIN_CALL)}


def run(pipe, call, prompt=PROMPT, steps=2, **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                output_type="latent", **{**call, **extra}).images


class Probe(attnctl.Controller):
    """An observer keeping each call's site, layout, q, k and the probabilities in use."""

    observer = True
    handles_key_mask = True

    def __init__(self):
        self.calls = []

    def __call__(self, call):
        self.calls.append(dict(site=call.site.name, text=call.text, image=call.image, rows=call.step.cond_rows,
                               q=call.q, k=call.k, scale=call.scale, bias=call.key_bias, probs=call.text_probs()))


def encoder_ids(pipe, action):
    """The input ids of the text encoder's first call while `action` runs."""
    seen = []
    spy = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        action()
    finally:
        spy.remove()
    return seen[0]


@pytest.mark.parametrize("variant", list(PIPES))
def test_capture_is_exact_and_the_maps_are_the_joint_softmax(variant):
    """Bit for bit the plain pipeline's latents; every map the float64 softmax over the whole joint sequence, its
    image→text part, at double- and single-stream sites; [klein]'s negative call is unconditional."""
    build, call = PIPES[variant]
    pipe = build()
    before = dict(pipe.transformer.attn_processors)
    plain = run(pipe, call)
    probe, capture = Probe(), Capture(["dog", "cat"])
    with attnctl.apply(pipe, capture, probe, prompt=PROMPT):
        image = run(pipe, call)
    assert torch.equal(image, plain)
    assert dict(pipe.transformer.attn_processors) == before
    stages = {c["site"].split(".")[0] for c in probe.calls}
    assert stages == {"transformer_blocks", "single_transformer_blocks"}
    n_text = call["max_sequence_length"]
    for c in probe.calls:
        assert c["text"] == slice(0, n_text) and c["image"] == slice(n_text, n_text + 16)
        logits = (c["q"].double() @ c["k"].double().transpose(-1, -2)) * c["scale"]
        exact = torch.softmax(logits, dim=-1)[:, :, c["image"], c["text"]]
        assert c["bias"] is None and (c["probs"].double() - exact).abs().max() < 1e-6
    rows = [c["rows"] for c in probe.calls]
    if variant == "klein":  # per step: the prompt's call, then the negative's in the "uncond" context
        assert slice(0, 0) in rows and slice(0, 1) in rows
    else:
        assert all(r == slice(0, 1) for r in rows)
    assert {tuple(m.shape) for m in capture.maps().values()} == {(1, 2, 4, 4)}


@pytest.mark.parametrize("variant", list(PIPES))
def test_words_sit_where_the_chat_template_puts_them(variant):
    """The session's positions of "dog" hold dog's token in the ids the text encoder is given: after [dev]'s
    system message and its left padding, after [klein]'s <|im_start|>user header; the prompt's tokens are the
    template's, not a bare tokenization's."""
    build, call = PIPES[variant]
    pipe = build()
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
        ids = encoder_ids(pipe, lambda: run(pipe, call, steps=1))[0]
        positions = session.prompts[0].word_positions("dog")
    tokenizer = pipe.tokenizer
    assert tokenizer.decode(ids[positions]).strip() == "dog"
    pad = int((ids == tokenizer.pad_token_id).sum())
    assert pad > 0
    if variant == "dev":
        assert bool((ids[:pad] == tokenizer.pad_token_id).all())  # padding first
        assert tokenizer.convert_ids_to_tokens(int(ids[pad])) == "<s>"  # the template's start token, once
        before = tokenizer.decode(ids[pad:positions[0]])
        assert before.startswith("<s>[SYSTEM_PROMPT]You are an AI that reasons") and before.endswith("[INST]a red")
    else:
        assert bool((ids[-pad:] == tokenizer.pad_token_id).all())  # padding last
        assert tokenizer.decode(ids[:positions[0]]) == "<|im_start|>user\na red"
        tail = tokenizer.decode(ids[positions[0]:len(ids) - pad])
        assert tail.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_ast_and_layout_modulation_change_both_variants():
    for build, call in PIPES.values():
        pipe = build()
        plain = run(pipe, call)
        for method in (AST(LAYOUT), attnctl.LayoutModulation(CORNER)):
            with attnctl.apply(pipe, method, prompt=PROMPT):
                assert (run(pipe, call) - plain).abs().max() > 1e-5


def test_a_prompt_longer_than_the_template_allows_is_refused_before_any_step():
    """[klein] at max_sequence_length=16: the template's header, the prompt and its closing tokens need more, so
    the closing tokens are cut: refused naming the length it needs, before any step."""
    pipe = flux2_klein()
    before = dict(pipe.transformer.attn_processors)
    probe = Probe()
    with pytest.raises(UsageError, match=r"takes 21 tokens inside FLUX.2.s chat template, more than the 16 .*"
                                         r"max_sequence_length=21 or more"):
        with attnctl.apply(pipe, Capture(["cat"]), probe, prompt=PROMPT):
            run(pipe, {**KLEIN_CALL, "max_sequence_length": 16})
    assert not probe.calls
    assert dict(pipe.transformer.attn_processors) == before


def test_left_padding_at_another_length_is_refused_before_any_step():
    """[dev]'s tokenizer here pads on the left: at max_sequence_length 300 every word sits 212 positions earlier
    than at 512, where attnctl places it; refused naming the length that works."""
    pipe = flux2_dev()
    probe = Probe()
    with pytest.raises(UsageError, match="pads on the left.*call it with max_sequence_length=512"):
        with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
            run(pipe, {**DEV_CALL, "max_sequence_length": 300})
    assert not probe.calls


def test_another_prompt_or_system_message_is_refused():
    pipe = flux2_dev()
    with pytest.raises(UsageError, match="which is not the prompt attnctl.apply was given"):
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
            run(pipe, DEV_CALL, prompt="a red dog and a grey bird")
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
        pipe.system_message, saved = "You draw.", pipe.system_message
        try:
            with pytest.raises(UsageError, match="system message"):
                run(pipe, DEV_CALL)
        finally:
            pipe.system_message = saved


def test_kv_cache_processors_are_refused_naming_the_remedy():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor

    pipe = flux2_klein()
    saved = dict(pipe.transformer.attn_processors)
    pipe.transformer.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    try:
        with pytest.raises(UsageError, match="Flux2KVAttnProcessor, which attnctl cannot reproduce exactly"):
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pass
    finally:
        pipe.transformer.set_attn_processor(saved)


def test_sites_and_specs():
    from attnctl.models import check_spec

    sites = attnctl.sites_of(flux2_dev())
    assert [(s.name, s.stage, s.text_first) for s in sites] == [
        ("transformer_blocks.0.attn", "double", True), ("transformer_blocks.1.attn", "double", True),
        ("single_transformer_blocks.0.attn", "single", True), ("single_transformer_blocks.1.attn", "single", True)]
    assert check_spec("random:flux2?double=2&single=4") == {"double": 2, "single": 4}
    assert check_spec("random:flux2-klein") == {}
    with pytest.raises(UsageError, match="random:flux2-tiny"):
        check_spec("random:flux3")

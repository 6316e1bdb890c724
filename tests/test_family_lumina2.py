"""Lumina-Image 2.0 (Lumina2Pipeline): one single-stream sequence [caption; image; pads] per row, Gemma 2 text after
the pipeline's system prompt, padded on the right with only the kept tokens reaching the model, the negative prompt as a
second call: exact capture (also under the key mask rows of different lengths bring), words where the system prompt
puts them, the methods that read joint attention, and the bad inputs refused before any step. A tiny random pipeline,
built offline."""

import functools
import warnings

import pytest
import torch

import attnctl
from attnctl import AST, Capture, UsageError
from test_family_flux2 import LAYOUT, PROMPT, Probe
from test_family_zimage import processors

CALL = dict(height=64, width=64)  # 4x4 image tokens after the caption


@functools.cache
def lumina2():
    """random:lumina2-tiny."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline("random:lumina2-tiny")


def run(pipe, prompt=PROMPT, steps=2, **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                output_type="latent", **{**CALL, **extra}).images


def encoder_ids(pipe, action):
    """The input ids of the text encoder's first call while `action` runs (the pipeline passes them first)."""
    seen = []
    spy = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("input_ids", a[0] if a
                                                                                        else None)), with_kwargs=True)
    try:
        action()
    finally:
        spy.remove()
    return seen[0]


SAME_COUNT = "a grey dog and a red cat"  # as many tokens as PROMPT: one call may hold both


@pytest.mark.parametrize("negative", [None, ["", "blurry, " * 6]], ids=["same lengths", "key mask"])
def test_capture_is_exact_and_the_maps_are_the_sequence_softmax(negative):
    """Bit for bit the plain pipeline's latents; every map the float64 softmax over the whole sequence, its
    image→text part, the text the caption's kept tokens, the image right after it; the negative prompt's call (its
    rows of different lengths key-masked) is unconditional."""
    pipe = lumina2()
    prompts = PROMPT if negative is None else [PROMPT, SAME_COUNT]
    before = processors(pipe.transformer)
    plain = run(pipe, prompt=prompts, negative_prompt=negative)
    probe, capture = Probe(), Capture(["dog", "cat"])
    with attnctl.apply(pipe, capture, probe, prompt=prompts) as session:
        image = run(pipe, prompt=prompts, negative_prompt=negative)
        n_text = session.prompts[0].token_count
    assert torch.equal(image, plain)
    assert processors(pipe.transformer) == before
    assert [c["site"] for c in probe.calls[:2]] == ["layers.0.attn", "layers.1.attn"]
    cond = [c for c in probe.calls if c["rows"].stop]
    assert len(cond) == 4 and len(probe.calls) == 8  # per step: the prompt's call, then the negative's
    for c in cond:
        assert c["text"] == slice(0, n_text) and c["image"] == slice(n_text, n_text + 16) and c["bias"] is None
    for c in probe.calls:
        bias = 0 if c["bias"] is None else c["bias"].double()
        logits = (c["q"].double() @ c["k"].double().transpose(-1, -2)) * c["scale"] + bias
        exact = torch.softmax(logits, dim=-1)[:, :, c["image"], c["text"]]
        assert (c["probs"].double() - exact).abs().max() < 1e-6
    assert (negative is None) == all(c["bias"] is None for c in probe.calls)
    assert {tuple(m.shape) for m in capture.maps().values()} == {(1 if negative is None else 2, 2, 4, 4)}


def test_words_sit_where_the_system_prompt_puts_them():
    """The session's positions of "dog" hold dog's token among the ids the encoder is given: after <bos>, the
    system prompt and " <Prompt Start> ", padded on the right (Gemma's tokenizer pads on the left; the pipeline sets
    the right)."""
    pipe = lumina2()
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
        ids = encoder_ids(pipe, lambda: run(pipe, steps=1))[0]
        positions = session.prompts[0].word_positions("dog")
        count = session.prompts[0].token_count
    kept = ids[ids != pipe.tokenizer.pad_token_id]
    assert len(kept) == count and bool((ids[count:] == pipe.tokenizer.pad_token_id).all())
    assert pipe.tokenizer.decode(kept[positions]).strip() == "dog"
    before = pipe.tokenizer.decode(kept[: positions[0]])
    assert before.startswith("<bos>You are an assistant designed") and before.endswith("<Prompt Start> a red")


def test_ast_changes_the_image():
    pipe = lumina2()
    plain = run(pipe)
    with attnctl.apply(pipe, AST(LAYOUT)):
        assert (run(pipe) - plain).abs().max() > 1e-3


def test_a_word_cut_by_max_sequence_length_is_refused_before_any_step():
    """The system prompt takes most of a short text: at max_sequence_length 47, "cat" (position 49) is cut."""
    pipe = lumina2()
    probe = Probe()
    with attnctl.apply(pipe, Capture(["cat"]), probe, prompt=PROMPT) as session:
        position = session.prompts[0].word_positions("cat")[0]
        with pytest.raises(UsageError, match=f"'cat' is at token position {position} .*limit of 47 text tokens.*"
                                             f"max_sequence_length\\) to at least {position + 2}"):
            run(pipe, max_sequence_length=47)
    assert not [c for c in probe.calls if c["rows"].stop]


def test_another_system_prompt_or_prompt_is_refused():
    pipe = lumina2()
    for extra in (dict(system_prompt="You draw."), dict(prompt="a red dog and a grey bird")):
        probe = Probe()
        with pytest.raises(UsageError, match="which is not the prompt attnctl.apply was given .* system prompt"):
            with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
                run(pipe, **extra)
        assert not probe.calls


def test_prompts_of_different_token_counts_in_one_call_are_refused():
    pipe = lumina2()
    prompts = [PROMPT, "a dog"]
    probe = Probe()
    with pytest.raises(UsageError, match="prompts of 2 different token counts .* call the pipeline once per prompt"):
        with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=prompts):
            run(pipe, prompt=prompts)
    assert not probe.calls


def test_prompt_embeds_of_another_prompt_are_refused():
    pipe = lumina2()
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a red dog", device="cpu")
    probe = Probe()
    with pytest.raises(UsageError, match="a caption of .* tokens where the prompt 'a red dog and a grey cat'"):
        with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
            pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                 negative_prompt_attention_mask=negative_mask, num_inference_steps=1, output_type="latent", **CALL)
    assert not probe.calls
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPT, device="cpu")
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
        image = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                     negative_prompt_attention_mask=negative_mask, num_inference_steps=2, output_type="latent",
                     generator=torch.Generator().manual_seed(0), **CALL).images
    assert torch.equal(image, run(pipe))


def test_sites_and_specs():
    from attnctl.models import check_spec

    sites = attnctl.sites_of(lumina2())
    assert [(s.name, s.kind, s.text_first) for s in sites] == [("layers.0.attn", "joint", True),
                                                                 ("layers.1.attn", "joint", True)]
    assert check_spec("random:lumina2?layers=4") == {"layers": 4}
    assert check_spec("random:lumina2") == {}

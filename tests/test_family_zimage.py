"""Z-Image (ZImagePipeline): one single-stream sequence [image; image pads; text; text pads] per row, Qwen3 text in
a chat template with only the prompt's tokens kept, classifier-free guidance batched [prompt, negative]: exact capture
(also under the key mask rows of different lengths bring), words where the template puts them, the methods that
read joint attention, and the bad inputs refused before any step. A tiny random pipeline, built offline."""

import functools
import warnings

import pytest
import torch

import attnctl
from attnctl import AST, Capture, UsageError
from test_family_flux2 import LAYOUT, PROMPT, Probe, encoder_ids

CALL = dict(height=64, width=64)  # 4x4 image tokens (16, padded to 32), then the caption


def processors(denoiser):
    """Each attention module's processor (ZImageTransformer2DModel has no `attn_processors`)."""
    return {name: m.processor for name, m in denoiser.named_modules() if hasattr(m, "processor")}


@functools.cache
def zimage():
    """random:zimage-tiny."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline("random:zimage-tiny")


def run(pipe, prompt=PROMPT, steps=2, **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                output_type="latent", **{**CALL, **extra}).images


LONG_NEGATIVE = "blurry, " * 12  # a caption of more than 32 tokens: the rows' sequences differ, a key mask joins


@pytest.mark.parametrize("negative", [None, LONG_NEGATIVE], ids=["same lengths", "key mask"])
def test_capture_is_exact_and_the_maps_are_the_sequence_softmax(negative):
    """Bit for bit the plain pipeline's latents; every map the float64 softmax over the whole sequence (with the
    model's key mask where the prompt's and the negative prompt's rows differ in length), its image→text part; the
    image is the first 16 tokens, the text starts after the image's pads (32); the prompt's rows come first."""
    pipe = zimage()
    before = processors(pipe.transformer)
    plain = run(pipe, negative_prompt=negative)
    probe, capture = Probe(), Capture(["dog", "cat"])
    with attnctl.apply(pipe, capture, probe, prompt=PROMPT):
        image = run(pipe, negative_prompt=negative)
    assert torch.equal(image, plain)
    assert processors(pipe.transformer) == before
    assert [c["site"] for c in probe.calls[:2]] == ["layers.0.attention", "layers.1.attention"]
    for c in probe.calls:
        n = c["k"].shape[2]
        assert c["image"] == slice(0, 16) and c["text"] == slice(32, n) and c["rows"] == slice(0, 1)
        assert c["q"].shape[0] == 2  # [prompt, negative]
        assert (c["bias"] is None) == (negative is None)
        bias = 0 if c["bias"] is None else c["bias"].double()
        logits = (c["q"].double() @ c["k"].double().transpose(-1, -2)) * c["scale"] + bias
        exact = torch.softmax(logits, dim=-1)[:, :, c["image"], c["text"]]
        assert (c["probs"].double() - exact).abs().max() < 1e-6
        if negative is not None:  # the prompt's row: its caption and pads are keys, the batch padding is not
            assert bool((c["bias"][0, 0, 0, :64] == 0).all()) and bool(torch.isinf(c["bias"][0, 0, 0, 64:]).all())
    assert {tuple(m.shape) for m in capture.maps().values()} == {(1, 2, 4, 4)}


def test_cfg_truncation_makes_the_later_steps_all_conditional():
    pipe = zimage()
    probe = Probe()
    with attnctl.apply(pipe, probe, prompt=PROMPT):
        run(pipe, steps=4, cfg_truncation=0.2)
    per_step = {}
    for c in probe.calls:
        per_step.setdefault(c["q"].shape[0], set()).add((c["rows"].start, c["rows"].stop))
    assert per_step == {2: {(0, 1)}, 1: {(0, 1)}}  # guided steps [prompt, negative], then the prompt alone


def test_words_sit_where_the_chat_template_puts_them():
    """The session's positions of "dog" hold dog's token among the caption tokens the encoder's mask keeps (the
    templated prompt, after <|im_start|>user): no padding reaches the model."""
    pipe = zimage()
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
        ids = encoder_ids(pipe, lambda: run(pipe, steps=1))[0]
        positions = session.prompts[0].word_positions("dog")
        count = session.prompts[0].token_count
    kept = ids[ids != pipe.tokenizer.pad_token_id]
    assert len(kept) == count and pipe.tokenizer.decode(kept[positions]).strip() == "dog"
    assert pipe.tokenizer.decode(kept[: positions[0]]) == "<|im_start|>user\na red"
    assert pipe.tokenizer.decode(kept[positions[0]:]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_ast_changes_the_image():
    pipe = zimage()
    plain = run(pipe)
    with attnctl.apply(pipe, AST(LAYOUT)):
        assert (run(pipe) - plain).abs().max() > 1e-3


def test_a_prompt_longer_than_the_template_allows_is_refused_before_any_step():
    pipe = zimage()
    count = len(pipe.tokenizer(pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True))["input_ids"])
    probe = Probe()
    with pytest.raises(UsageError, match=f"takes {count} tokens inside Z-Image's chat template, more than the 12 "
                                         f".*max_sequence_length={count} or more"):
        with attnctl.apply(pipe, Capture(["cat"]), probe, prompt=PROMPT):
            run(pipe, max_sequence_length=12)
    assert not probe.calls


def test_prompt_embeds_of_another_prompt_are_refused():
    pipe = zimage()
    embeds, negative = pipe.encode_prompt("a red dog", device="cpu")
    probe = Probe()
    with pytest.raises(UsageError, match="a caption of .* tokens where the prompt 'a red dog and a grey cat'"):
        with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
            pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=1, output_type="latent",
                 **CALL)
    assert not probe.calls
    embeds, negative = pipe.encode_prompt(PROMPT, device="cpu")
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
        image = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
                     output_type="latent", generator=torch.Generator().manual_seed(0), **CALL).images
    assert torch.equal(image, run(pipe))


def test_sites_and_specs():
    from attnctl.models import check_spec

    sites = attnctl.sites_of(zimage())
    assert [(s.name, s.kind, s.text_first) for s in sites] == [("layers.0.attention", "joint", False),
                                                                 ("layers.1.attention", "joint", False)]
    assert check_spec("random:zimage?layers=4") == {"layers": 4}
    assert attnctl.prompt_tokens(zimage(), PROMPT)[0].word_positions("cat") == [9]

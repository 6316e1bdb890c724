"""Qwen-Image 2.1 (QwenImage21Pipeline): one block-causal sequence [text; image] per row (the text causal, the image
over every token), the text's keys and values cached after the first step, Qwen3-VL text after a system message whose
tokens the pipeline drops: exact capture (with the cache, without it, under guidance and under the key mask prompts of
different lengths bring), the whole sequence shown at every step, the text rows left causal and the cache as the plain
run fills it, words where the template puts them, the methods that read joint attention (binding's gradient forwards
and the contrast locator's predictions run without the pipeline's cache), and bad input refused before any step. A
tiny random pipeline, built offline (its Qwen3-VL processor has no video processor: no torchvision)."""

import functools
import warnings

import pytest
import torch
from PIL import Image

import attnctl
from attnctl import AST, Capture, UsageError
from attnctl.attention import attention
from attnctl.methods.registry import METHODS
from test_family_flux2 import LAYOUT, PROMPT, Probe, encoder_ids

CALL = dict(height=64, width=64)  # 4x4 image tokens after the text
N_IMAGE = 16
TWO = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0.5, 0.5, 1]},
                                     {"phrase": "grey cat", "box": [0.5, 0, 1, 0.5]}]}


def controller(name):
    m = METHODS[name]
    return m.build(m.config(), targets=["dog", "cat"], layout=TWO)


@functools.cache
def qwenimage21(spec="random:qwenimage21-tiny"):
    """random:qwenimage21-tiny (two blocks), or another spec."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline(spec)


def run(pipe, prompt=PROMPT, steps=3, **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                output_type="latent", **{**CALL, **extra}).images


def processors(pipe):
    return dict(pipe.transformer.attn_processors)


class Denoiser:
    """Records each denoiser call's KV-cache mode, cache, whether its latents need a gradient, and each block's
    query input length (to_q's tokens: the text's are computed at the prefill only)."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.queries = pipe, [], []

    def __enter__(self):
        def call(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.calls.append((kwargs.get("kv_cache_mode"), kwargs.get("kv_cache"), x.requires_grad))

        self.handles = [self.pipe.transformer.register_forward_pre_hook(call, with_kwargs=True),
                        self.pipe.transformer.transformer_blocks[0].attn.to_q.register_forward_pre_hook(
                            lambda m, a: self.queries.append(a[0].shape[1]))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class RowsLSE(attnctl.Controller):
    """An observer keeping each call's `lse()` (every row's, after the maps were read) and its float64 reference."""

    observer = True

    def __init__(self):
        self.pairs = []

    def __call__(self, call):
        logits = (call.q.double() @ call.k.double().transpose(-1, -2)) * call.scale
        self.pairs.append((call.lse(), torch.logsumexp(logits, dim=-1)))


@pytest.mark.parametrize("extra", [{}, {"use_kv_cache": False}, {"negative_prompt": "blurry", "true_cfg_scale": 4.0}],
                         ids=["kv cache", "no cache", "guidance"])
def test_capture_is_exact_and_every_step_shows_the_whole_sequence(extra):
    """Bit for bit the plain pipeline's latents; at every step each site shows [text; image], the text's queries at
    cached steps the prefill's (the model computes the image's alone: to_q sees the text at the first step only), and
    every map is the float64 softmax of the image's rows over every key, its text part, every row's LSE that of
    every key; the negative prompt's call is unconditional."""
    pipe = qwenimage21()
    before = processors(pipe)
    plain = run(pipe, **extra)
    probe, capture, lse = Probe(), Capture(["dog", "cat"]), RowsLSE()
    with attnctl.apply(pipe, capture, probe, lse, prompt=PROMPT), Denoiser(pipe) as seen:
        image = run(pipe, **extra)
    assert torch.equal(image, plain)
    assert len(lse.pairs) == len(probe.calls)
    assert all((ours.double() - exact).abs().max() < 1e-5 for ours, exact in lse.pairs)
    assert processors(pipe) == before
    cached = "use_kv_cache" not in extra
    calls_per_step = 2 if "negative_prompt" in extra else 1
    assert [mode for mode, _, _ in seen.calls] == ([None] * 3 if not cached else
                                                   ["extract"] * calls_per_step + ["cached"] * 2 * calls_per_step)
    assert all(n > N_IMAGE for n in seen.queries[:calls_per_step])
    assert all((n == N_IMAGE) == cached for n in seen.queries[calls_per_step:])
    assert len(probe.calls) == 3 * 2 * calls_per_step
    first = {}
    for c in probe.calls:
        n_text = c["k"].shape[2] - N_IMAGE
        assert c["text"] == slice(0, n_text) and c["image"] == slice(n_text, n_text + N_IMAGE)
        assert c["q"].shape[2] == n_text + N_IMAGE and c["bias"] is None
        text_q = first.setdefault((c["site"], n_text, c["rows"].stop), c["q"][:, :, :n_text])
        if cached:  # the text is step-independent: its queries are the prefill's at every step
            assert torch.equal(c["q"][:, :, :n_text], text_q)
        logits = (c["q"].double() @ c["k"].double().transpose(-1, -2)) * c["scale"]
        exact = torch.softmax(logits, dim=-1)[:, :, c["image"], c["text"]]
        assert (c["probs"].double() - exact).abs().max() < 1e-6
    conditional = [c["rows"] for c in probe.calls]
    assert conditional.count(slice(0, 1)) == 3 * 2 and conditional.count(slice(0, 0)) == 3 * 2 * (calls_per_step - 1)
    assert {tuple(m.shape) for m in capture.maps().values()} == {(1, 2, 4, 4)}


@pytest.mark.parametrize("extra", [{}, {"use_kv_cache": False},
                                   {"negative_prompt": ["blurry", "an ugly bad picture of things"],
                                    "true_cfg_scale": 4.0}], ids=["kv cache", "no cache", "guidance"])
def test_capture_is_exact_under_the_key_mask_of_prompts_of_different_lengths(extra):
    """Two prompts of different token counts in one call (and under guidance two negative prompts of other
    lengths): the shorter one's text is padded on the right and its padding keys masked (the image's rows and the
    text's); bit for bit, and the maps give the padding 0."""
    pipe = qwenimage21()
    prompts = [PROMPT, "a dog"]
    plain = run(pipe, prompt=prompts, **extra)
    probe = Probe()
    with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=prompts) as session:
        image = run(pipe, prompt=prompts, **extra)
        counts = [p.token_count for p in session.prompts]
    assert torch.equal(image, plain)
    conditional = [c for c in probe.calls if c["rows"] == slice(0, 2)]
    assert len(conditional) == 3 * 2 and len(probe.calls) == 3 * 2 * (2 if extra.get("negative_prompt") else 1)
    for c in conditional:
        assert c["bias"] is not None and c["text"].stop == max(counts)
        assert bool(torch.isinf(c["bias"][1, 0, 0, counts[1]:max(counts)]).all())
        assert bool((c["bias"][1, 0, 0, : counts[1]] == 0).all()) and bool((c["bias"][0] == 0).all())
        assert float(c["probs"][1, :, :, counts[1]:].abs().max()) == 0


class Replace(attnctl.Controller):
    """A method setting every call's output, every row's, to something else than the model's: half the plain
    (non-causal) attention over every key."""

    def __call__(self, call):
        call.set_output(attention(call.q, call.k, call.v) * 0.5)


@pytest.mark.parametrize("method", [Replace, lambda: AST(LAYOUT)], ids=["every row replaced", "AST"])
def test_methods_leave_the_texts_rows_causal_and_the_cache_as_the_plain_run_fills_it(method):
    """Under a method changing the image (one replacing every row's output at every site, AST), with three blocks:
    the text's keys and values the pipeline caches at the prefill are the plain run's bit for bit at every block,
    read at the second step: the text's rows keep the model's causal attention, whatever a method computes for
    them (a text row changed at a block would change the text's keys and values at the next)."""
    pipe = qwenimage21("random:qwenimage21-tiny?layers=3")

    def cached(action):
        layers = []
        with Denoiser(pipe) as seen:
            hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: layers.append(
                [(c.k.clone(), c.v.clone()) for c in kw["kv_cache"].layer_caches]) if len(seen.calls) == 2 else None,
                with_kwargs=True)
            try:
                image = action()
            finally:
                hook.remove()
        assert [mode for mode, _, _ in seen.calls] == ["extract", "cached", "cached"]
        return image, layers[0]

    plain, plain_cache = cached(lambda: run(pipe))
    with attnctl.apply(pipe, method()):
        image, cache = cached(lambda: run(pipe))
    assert (image - plain).abs().max() > 1e-4
    assert len(cache) == 3
    for (k, v), (plain_k, plain_v) in zip(cache, plain_cache):
        assert torch.equal(k, plain_k) and torch.equal(v, plain_v)


def test_words_sit_where_the_template_puts_them():
    """The session's positions of "dog" hold dog's token in the text the denoiser gets: the encoder's tokens its
    mask keeps (the prompt in the text-to-image template, padded on the left), less the system message's, which the
    pipeline drops."""
    pipe = qwenimage21()
    tokenizer = pipe.processor.tokenizer
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
        ids = encoder_ids(pipe, lambda: run(pipe, steps=1))[0]
        positions = session.prompts[0].word_positions("dog")
        count = session.prompts[0].token_count
    kept = ids[ids != tokenizer.pad_token_id]
    system = tokenizer.decode(kept[: pipe._drop_idx])
    kept = kept[pipe._drop_idx:]
    assert system == "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
    assert len(kept) == count and tokenizer.decode(kept[positions]).strip() == "dog"
    assert tokenizer.decode(kept[: positions[0]]) == "<|im_start|>user\na red"
    assert tokenizer.decode(kept[positions[0]:]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    text, _, _ = pipe.encode_prompt(PROMPT, device="cpu")
    assert text.shape[1] == count


def test_binding_with_guidance_and_two_images_runs_its_gradient_forwards_without_the_cache():
    """Binding moving at both steps of a guided call of two images per prompt: its gradient forwards (latents with a
    gradient) get no KV cache and compute the text themselves; the pipeline's own calls keep theirs (extract, then
    cached), each guidance call its own, and the image changes."""
    pipe = qwenimage21()
    extra = dict(negative_prompt="blurry", true_cfg_scale=4.0, num_images_per_prompt=2)
    plain = run(pipe, steps=2, **extra)
    m = METHODS["binding"]
    binding = m.build(m.config(max_iter_to_alter=2), targets=["dog", "cat"], layout=LAYOUT)
    with attnctl.apply(pipe, binding, prompt=PROMPT) as session, Denoiser(pipe) as seen:
        image = session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                        output_type="latent", **CALL, **extra).images
    gradient = [(mode, cache) for mode, cache, grad in seen.calls if grad]
    own = [(mode, cache) for mode, cache, grad in seen.calls if not grad][1:]  # after the run stopped at its first
    assert len(gradient) == 2 and all(mode is None and cache is None for mode, cache in gradient)
    assert [mode for mode, _ in own] == ["extract", "extract", "cached", "cached"]
    assert own[0][1] is own[2][1] and own[1][1] is own[3][1] and own[0][1] is not own[1][1]
    assert [h["step"] for h in binding.history] == [0, 1]
    assert image.shape == plain.shape and (image - plain).abs().max() > 1e-4


def test_the_contrast_locator_predicts_without_the_cache():
    """Relocation's contrast locator predicts for the prompt and for the prompt without each object, each a forward
    without the pipeline's cache (the prompt without an object is another text), reading the image's part of the
    prediction: the relocation acts."""
    pipe = qwenimage21()
    plain = run(pipe, steps=4)
    m = METHODS["relocation"]
    relocation = m.build(m.config(locator="contrast", read_fraction=0.5), targets=None, layout=LAYOUT)
    with attnctl.apply(pipe, relocation, prompt=PROMPT) as session, Denoiser(pipe) as seen:
        image = session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                        output_type="latent", **CALL).images
    assert [mode for mode, _, _ in seen.calls].count(None) == 2  # the prediction with the prompt, and without it
    assert (image - plain).abs().max() > 1e-4


def test_bad_input_is_refused_before_any_step():
    """Another prompt, condition images, prompt embeddings of another prompt and the flex-attention processor:
    each a UsageError naming the fix, before any step; the pipeline as it was."""
    pipe = qwenimage21()
    before = processors(pipe)
    cases = [
        (dict(prompt="a blue dog"), "gave its text encoder .*a blue dog.* pass the same prompt to both"),
        (dict(image=Image.new("RGB", (64, 64), (200, 30, 30))), "1 condition image.*call it without image="),
    ]
    text, mask, _ = pipe.encode_prompt("a red dog", device="cpu")
    cases.append((dict(prompt=None, prompt_embeds=text, prompt_embeds_mask=mask),
                  "a text of .* tokens where the prompt 'a red dog and a grey cat'"))
    for extra, message in cases:
        probe = Probe()
        with pytest.raises(UsageError, match=message):
            with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
                run(pipe, **extra)
        assert not probe.calls and processors(pipe) == before
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    pipe.transformer.set_attn_processor(QwenImage21FlexAttnProcessor())
    try:
        with pytest.raises(UsageError, match="QwenImage21FlexAttnProcessor .*set_attn_processor"):
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pass
    finally:
        pipe.transformer.set_attn_processor(before)
    text, mask, _ = pipe.encode_prompt(PROMPT, device="cpu")
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
        image = run(pipe, prompt=None, prompt_embeds=text, prompt_embeds_mask=mask)
    assert torch.equal(image, run(pipe))


@pytest.mark.parametrize("negative", ["blurry", "an ugly bad picture of things, blurry and grey"])
def test_prompt_embeddings_with_a_negative_prompt_under_guidance(negative):
    """The prompt given as prompt_embeds, the negative prompt as text, under guidance: the text encoder runs once,
    for the negative prompt (the pipeline says nothing of its guidance), which is not taken for the prompt: the run
    is the plain one bit for bit and the maps are made. Embeddings of another prompt are still refused before any
    step (by the text the denoiser gets), and so is another prompt given as text with the same negative prompt."""
    pipe = qwenimage21()
    extra = dict(negative_prompt=negative, true_cfg_scale=4.0)
    text, mask, _ = pipe.encode_prompt(PROMPT, device="cpu")
    plain = run(pipe, prompt=None, prompt_embeds=text, prompt_embeds_mask=mask, **extra)
    capture, encoded = Capture(["dog"]), []
    spy = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: encoded.append(kw["input_ids"]),
                                                      with_kwargs=True)
    try:
        with attnctl.apply(pipe, capture, prompt=PROMPT):
            image = run(pipe, prompt=None, prompt_embeds=text, prompt_embeds_mask=mask, **extra)
    finally:
        spy.remove()
    assert len(encoded) == 1 and negative in pipe.processor.tokenizer.decode(encoded[0][0])
    assert torch.equal(image, plain) and torch.equal(image, run(pipe, **extra))
    assert {tuple(m.shape) for m in capture.maps().values()} == {(1, 1, 4, 4)}
    other, other_mask, _ = pipe.encode_prompt("a red dog", device="cpu")
    for call, message in [(dict(prompt=None, prompt_embeds=other, prompt_embeds_mask=other_mask),
                           "a text of .* tokens where the prompt 'a red dog and a grey cat'"),
                          (dict(prompt="a blue dog"), "gave its text encoder .*a blue dog.* pass the same prompt")]:
        probe = Probe()
        with pytest.raises(UsageError, match=message):
            with attnctl.apply(pipe, Capture(["dog"]), probe, prompt=PROMPT):
                run(pipe, **call, **extra)
        assert not probe.calls


def test_sites_show_the_token_grid_and_sizes_are_multiples_of_two_tokens(capsys):
    """A token is 16 pixels: `attnctl sites` prints the model's grid (4x4 at 64x64); the pipeline floors the size to
    multiples of 32 (two tokens), so other sizes are refused naming the nearest it makes."""
    from attnctl.cli import main

    assert main(["sites", "--model", "random:qwenimage21-tiny", "--height", "64", "--width", "64"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[5] for r in rows if "transformer_blocks." in r] == ["4x4", "4x4"]
    assert main(["sites", "--model", "random:qwenimage21-tiny", "--height", "48", "--width", "64"]) == 2
    assert "--height 48 must be a multiple of 32 for this model" in capsys.readouterr().err
    from attnctl.run import call_arguments
    from attnctl.sampling import SamplingConfig

    with pytest.raises(UsageError, match="--width 80 must be a multiple of 32 for this model .*: e.g. 64 or 96"):
        call_arguments(qwenimage21(), SamplingConfig(height=64, width=80), "random:qwenimage21-tiny")


def test_sites_specs_and_the_offline_processor():
    from transformers import Qwen3VLProcessor

    from attnctl.models import check_spec

    pipe = qwenimage21()
    sites = attnctl.sites_of(pipe)
    assert [(s.name, s.kind, s.text_first) for s in sites] == [("transformer_blocks.0.attn", "joint", True),
                                                                ("transformer_blocks.1.attn", "joint", True)]
    assert check_spec("random:qwenimage21?layers=4") == {"layers": 4}
    assert attnctl.prompt_tokens(pipe, PROMPT)[0].word_positions("cat") == [9]
    assert isinstance(pipe.processor, Qwen3VLProcessor) and not hasattr(pipe.processor, "video_processor")

"""Families recognised by what their attention is: pipelines on a known denoiser class whose attention is of another
kind are refused before anything changes, with what is supported; FLUX.1 Kontext's context-image tokens are neither
the image nor tuned."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl import AST, Capture, NoiseChoice, UsageError
from attnctl.methods.registry import METHODS
from test_family_flux2 import DEV_CALL, KLEIN_CALL, flux2_dev, flux2_klein
from test_family_hidream import hidream
from test_family_lumina2 import lumina2
from test_family_qwenimage21 import qwenimage21
from test_family_zimage import processors, zimage

from conftest import call_kwargs, tiny_pipe


def kandinsky22():
    """A tiny random Kandinsky 2.2 decoder: a UNet2DConditionModel whose attention takes image embeddings through
    added key/value projections (AttnAddedKVProcessor2_0), and no tokenizer."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=8,
        encoder_hid_dim_type="image_proj", cross_attention_dim=16, attention_head_dim=4, block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"), layers_per_block=1,
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), norm_num_groups=4,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_time_scale_shift="scale_shift")
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, layers_per_block=1,
                   norm_num_groups=4, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4)
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(), movq=movq)


def test_kandinsky_is_refused_before_anything_changes():
    pipe = kandinsky22()
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(UsageError) as err:
        with attnctl.apply(pipe, Capture(["dog"]), prompt="a dog"):
            pass
    assert str(err.value) == (
        "KandinskyV22Pipeline: its UNet2DConditionModel has no attention over prompt tokens that attnctl knows (its "
        "attention processors: AttnAddedKVProcessor2_0; e.g. Kandinsky 2.x conditions on image embeddings); "
        "supported: UNet2DConditionModel (SD 1.x/2.x, SDXL; text cross-attention), SD3Transformer2DModel "
        "(SD3/3.5), FluxTransformer2DModel (FLUX.1), ChromaTransformer2DModel (Chroma), QwenImageTransformer2DModel "
        "(Qwen-Image), PixArtTransformer2DModel (PixArt-α/Σ), SanaTransformer2DModel (Sana), Flux2Transformer2DModel "
        "(FLUX.2 [dev]/[klein]), ZImageTransformer2DModel (Z-Image), Lumina2Transformer2DModel (Lumina-Image 2.0), "
        "HiDreamImageTransformer2DModel (HiDream-I1), QwenImage21Transformer2DModel (Qwen-Image 2.1); to ask for "
        "another, open an issue naming the pipeline class")
    assert dict(pipe.unet.attn_processors) == before and not hasattr(pipe.unet, "_diffusers_hook")


def edit(pipe, context, prompt, kwargs):
    return pipe(image=context, prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_flux_kontext_context_tokens_are_neither_the_image_nor_tuned():
    from diffusers import FluxKontextPipeline
    from PIL import Image

    flux = tiny_pipe("flux")
    pipe = FluxKontextPipeline(**flux.components)
    context = Image.fromarray((np.random.default_rng(0).random((96, 64, 3)) * 255).astype(np.uint8))  # not 64x64
    prompt = "a red dog and a grey cat"
    kwargs = dict(call_kwargs("flux", steps=2), max_area=64 * 64, _auto_resize=False)  # else it generates 1024²
    plain = edit(pipe, context, prompt, kwargs)
    before = dict(pipe.transformer.attn_processors)
    capture = Capture(["dog"])
    with attnctl.apply(pipe, capture, prompt=prompt) as session:
        image = edit(pipe, context, prompt, kwargs)
        assert session.step.token_grid == (4, 4)  # 64² generated: 8 pixels per latent, 2x2 latents per token
    assert np.array_equal(image, plain)
    assert {tuple(m.shape[-2:]) for m in capture.maps().values()} == {(4, 4)}
    layout = {"prompt": prompt, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
    with attnctl.apply(pipe, AST(layout)):
        tuned = edit(pipe, context, prompt, kwargs)
    assert np.abs(tuned - plain).max() > 1e-3
    assert dict(pipe.transformer.attn_processors) == before


class Passes(attnctl.Controller):
    """An observer: per denoiser call, the step, the batch size and the conditional rows; per attention call whether
    a method changed it."""

    observer = True
    handles_key_mask = True  # it reads nothing masked

    def attach(self, session):
        self.calls = []

    def begin_step(self, step):
        self.calls.append([step.index, step.batch_size, (step.cond_rows.start, step.cond_rows.stop), set()])

    def __call__(self, call):
        self.calls[-1][3].add(call.modified)


def test_sd3_skip_layer_guidance_pass_is_neither_conditional_nor_tuned():
    pipe = tiny_pipe("sd3")
    prompt = "a red dog and a grey cat"
    kwargs = call_kwargs("sd3", steps=3, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                         skip_layer_guidance_stop=1.0)  # the extra pass at steps 1 and 2 (i > 0 and i < 3)
    passes = Passes()
    layout = {"prompt": prompt, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
    with attnctl.apply(pipe, AST(layout), passes):
        pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    tuned = {False, True}  # the schedule leaves the first block alone
    assert passes.calls == [
        [0, 2, (1, 2), tuned],
        [1, 2, (1, 2), tuned], [1, 1, (0, 0), {False}],  # the skip-layer pass: one row, left alone
        [2, 2, (1, 2), tuned], [2, 1, (0, 0), {False}],
    ]


# --- the support matrix: every cell is checked here, and the README's matrix is this table rendered ------------------
@functools.cache
def pixart():
    """A tiny random PixArt-Σ: T5 text with a padding mask, cross-attention in every block (built once)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from attnctl.models import _t5, _vae

    torch.manual_seed(0)
    t5, tokenizer = _t5(16)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, norm_type="ada_norm_single",
        use_additional_conditions=False, patch_size=1)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=_vae(4), transformer=transformer.eval(),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def chroma():
    """A tiny random Chroma: FLUX-schnell blocks, T5 text with its padding mask, CFG as a second call (built once)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from attnctl.models import _t5, _vae

    torch.manual_seed(0)
    t5, tokenizer = _t5(16)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=t5,
                          tokenizer=tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def byte_tokens(specials, merges=()):
    """A byte-level BPE tokenizer where every byte is a token but the pairs `merges` (each merged pair a token after
    the bytes), and `specials` added after those."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + ["".join(pair) for pair in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def byte_level_tokenizer():
    """Built offline, it stands in for Qwen2's tokenizer (byte-level, Qwen's chat tokens; a far longer split of
    every text)."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return PreTrainedTokenizerFast(tokenizer_object=byte_tokens(specials), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:])


def gemma_like_tokenizer(merges=()):
    """Built offline, it stands in for Gemma's tokenizer: a start token before every text, no end token, and
    padding on the left (Sana's pipeline pads on the right all the same); byte tokens but the pairs `merges`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = byte_tokens(["<pad>", "<eos>", "<bos>"], merges)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", padding_side="left")


@functools.cache
def sana():
    """A tiny random Sana (with Sana 1.5's q/k norms over all heads): a one-layer Gemma-2 encoder, cross-attention
    in every block (built once)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tokenizer = gemma_like_tokenizer()
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id))
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads")
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder.eval(), vae=vae.eval(),
                        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def qwen_image():
    """A tiny random Qwen-Image: a one-layer Qwen2.5-VL text encoder, its chat template, joint attention (built
    once)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    n = len(tokenizer)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=n, max_position_embeddings=2048, bos_token_id=None,
                eos_token_id=n - 1, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                  vocab_size=n, bos_token_id=None,
                                                                  eos_token_id=n - 1))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2,
                                              joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                             text_encoder=encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sana_sprint():
    """Sana Sprint: the tiny Sana's text encoder and VAE with a guidance-embedding transformer and SCM steps."""
    from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads", guidance_embeds=True)
    pipe = SanaSprintPipeline(**{**sana().components, "transformer": transformer.eval(), "scheduler": SCMScheduler()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


QWEN_CALL = dict(max_sequence_length=256)  # the byte-level tokenizer leaves ~90 template tokens before the prompt
PIXART_CALL = dict(max_sequence_length=32, use_resolution_binning=False, clean_caption=False)
SANA_CALL = dict(height=32, width=32, max_sequence_length=40, use_resolution_binning=False)  # 16x16 tokens


def kontext():
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**tiny_pipe("flux").components)


@functools.cache
def pipe_of(family):
    return next(build for name, build, _ in SUPPORT if name == family)()


# on the UNets
CROSS = "capture regulation attend-excite binding layout-modulation noise-choice relocation contrast-guidance"
JOINT = "capture ast binding layout-modulation noise-choice relocation contrast-guidance"  # on SD3 and FLUX.1
SUPPORT = [  # family (pipeline), how to build a tiny one, the columns that work there (the others are refused)
    ("SD 1.x / 2.x", lambda: tiny_pipe("unet"), CROSS),
    ("SDXL", lambda: tiny_pipe("sdxl"), CROSS),
    ("SD3 / SD3.5", lambda: tiny_pipe("sd3"), JOINT),
    ("FLUX.1 dev / schnell", lambda: tiny_pipe("flux"), JOINT),
    ("FLUX.1 Kontext", kontext, JOINT),
    ("Kandinsky 2.2", kandinsky22, ""),
    ("PixArt-Σ", pixart, "capture regulation layout-modulation contrast-guidance"),
    ("Sana", sana, CROSS),
    ("Sana Sprint", sana_sprint, CROSS),
    ("Chroma", chroma, "capture ast binding layout-modulation noise-choice relocation contrast-guidance"),
    ("Qwen-Image", qwen_image, JOINT),
    ("FLUX.2 [dev]", flux2_dev, "capture ast layout-modulation noise-choice relocation contrast-guidance"),
    ("FLUX.2 [klein]", flux2_klein, "capture ast layout-modulation noise-choice relocation contrast-guidance"),
    ("Z-Image", zimage, "capture ast layout-modulation relocation"),
    ("Lumina-Image 2.0", lumina2, "capture ast binding layout-modulation noise-choice relocation contrast-guidance"),
    ("HiDream-I1", hidream, "capture ast layout-modulation relocation"),
    ("Qwen-Image 2.1", qwenimage21, JOINT),
]
# known bugs, checked as they are (neither refused nor a change): a fix fails the cell until the table says what works
BUGS: dict[tuple[str, str], str] = {}  # (family, column): what goes wrong
COLUMNS = ("capture", *METHODS)  # capture, then every method of the registry
PROMPT = "a red dog and a grey cat"
LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0.5, 0.5, 1]},
                                        {"phrase": "grey cat", "box": [0.5, 0, 1, 0.5]}]}
FAST = {"regulation": dict(edit_steps=2, iterations=2),  # options that act within 2 steps, and act once
        "attend-excite": dict(max_iter_to_alter=1, max_refinement_steps=1), "binding": dict(max_iter_to_alter=1)}
REFUSALS = (  # what a refusal names: what works, or what the pipeline lacks
    "supported: ", "edits text cross-attention (", "tunes joint text-image attention (", "reads UNet cross-attention (",
    "the methods that act on the attention of the pipeline's own denoiser calls can", "callback_on_step_end")
YES, EDITS, NO, BUG = "yes, exact", "yes", "refused", "no (bug)"


def cell(family, column):
    if (family, column) in BUGS:
        return BUG
    works = column in next(works.split() for name, _, works in SUPPORT if name == family)
    return NO if not works else YES if column == "capture" else EDITS


def support_matrix() -> str:
    """The README's support matrix, rendered from SUPPORT, BUGS and the registry's methods."""
    heads = ["capture (token maps)", *(f"`{name}`" for name in METHODS)]
    rows = ["| family | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(cell(name, c) for c in COLUMNS) + " |" for name, _, _ in SUPPORT]
    return "\n".join(rows)


def controller(column):
    if column == "capture":
        return Capture(["dog"])
    m = METHODS[column]
    return m.build(m.config(**FAST.get(column, {})), targets=["dog", "cat"], layout=LAYOUT)


def size(family, column):  # Regulation's default layers on the UNets are 8x8 at 256²
    return 256 if column == "regulation" and family in ("SD 1.x / 2.x", "SDXL") else 64


def generate(family, controllers, size=64):
    kwargs = call_of(family, size)
    with attnctl.apply(pipe_of(family), *controllers, prompt=PROMPT) as session:  # the methods moving latents need it
        return session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


def call_of(family, size=64) -> dict:
    """The test call's arguments for `family` (two steps, latents out), less the prompt and generator."""
    kwargs = dict(call_kwargs("flux" if "FLUX" in family else "unet", steps=2), output_type="latent", height=size,
                  width=size)
    if "PixArt" in family:
        kwargs.update(PIXART_CALL)
    if "Sana" in family:
        kwargs.update(SANA_CALL)
    if "Chroma" in family:
        kwargs.update(max_sequence_length=32)
    if family == "Qwen-Image":
        kwargs.update(QWEN_CALL)
    if "FLUX.2" in family:  # [dev]'s tokenizer here pads on the left: words are placed for the default 512
        kwargs.update(DEV_CALL if "dev" in family else KLEIN_CALL)
    if "Kontext" in family:
        kwargs.update(image=Image.new("RGB", (64, 64), (200, 30, 30)), max_area=64 * 64, _auto_resize=False)
    return kwargs


@functools.cache
def plain(family, size):
    return generate(family, [], size)


def changed(image, plain):
    return float((image - plain).abs().max()) > 1e-4


def acted(method, image, plain):
    """Whether a method acted: it changed the image; noise choice, which keeps the run's own noise where that scores
    best, read different scores for its candidates and changed the image exactly where it chose another noise."""
    if isinstance(method, NoiseChoice):
        scores, chosen = method.choices[0]["scores"], method.choices[0]["chosen"]
        return len(set(scores)) == len(scores) and changed(image, plain) == (chosen != 0)
    return changed(image, plain)


def state(pipe):
    """The denoiser's processors, and which of the denoiser and the text encoders carry a diffusers hook."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3",
                                                        "text_encoder_4")]
    return processors(denoiser), [hasattr(m, "_diffusers_hook") for m in (denoiser, *encoders) if m is not None]


@pytest.mark.parametrize("family, column", [(name, c) for name, _, _ in SUPPORT for c in COLUMNS],
                         ids=[f"{name}-{c}" for name, _, _ in SUPPORT for c in COLUMNS])
def test_support_matrix(family, column):
    """One cell, run with the 2-step call of the family: capture leaves the image bit for bit, a method changes it,
    a refusal is a UsageError before any step that names what works (or what the pipeline lacks), a known bug is
    neither. The pipeline is left as it was."""
    before, px = state(pipe_of(family)), size(family, column)
    if cell(family, column) == NO:
        passes = Passes()
        with pytest.raises(UsageError) as err:
            generate(family, [controller(column), passes], px)
        assert not getattr(passes, "calls", None) and any(r in str(err.value) for r in REFUSALS), str(err.value)
    elif cell(family, column) == BUG:
        try:
            image = generate(family, [controller(column)], px)
        except UsageError as err:
            pytest.fail(f"now refused, mark it so: {err}")
        except (RuntimeError, IndexError):
            pass
        else:
            assert not changed(image, plain(family, px)), "now changes the image: mark it so"
    elif cell(family, column) == YES:
        assert torch.equal(generate(family, [controller(column)], px), plain(family, px))
    else:
        method = controller(column)
        assert acted(method, generate(family, [method], px), plain(family, px))
    assert state(pipe_of(family)) == before


def test_binding_on_flux_kontext_moves_the_generated_images_latents_alone():
    """Binding on FLUX.1 Kontext, moving at both steps: every denoiser call (the pipeline's and the gradient forwards)
    gets latents of the generated image's length followed by the context image's tokens as the pipeline built them,
    bit for bit; the pipeline's own calls get the moved latents, and the result differs from the plain one."""
    family = "FLUX.1 Kontext"
    pipe = pipe_of(family)
    before = state(pipe)
    calls = []

    def record(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        calls.append((x.detach().clone(), x.requires_grad))

    m = METHODS["binding"]
    binding = m.build(m.config(max_iter_to_alter=2), targets=["dog", "cat"], layout=LAYOUT)
    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        plain_image = generate(family, [])
        plain_calls = [x for x, _ in calls]
        calls.clear()
        image = generate(family, [binding])
    finally:
        handle.remove()
    n = 4 * 4  # 64² generated: 4x4 tokens; the 64² context image's 16 tokens follow them
    assert len(plain_calls) == 2 and plain_calls[0].shape[1] == 2 * n
    context = plain_calls[0][:, n:]
    assert torch.equal(plain_calls[1][:, n:], context)
    gradient = [x for x, grad in calls if grad]
    probe, *own = [x for x, grad in calls if not grad]  # the run stopped at its first denoiser call, then the run
    assert [h["step"] for h in binding.history] == [0, 1] and len(gradient) == 2 and len(own) == 2
    for x in [probe, *gradient, *own]:
        assert x.shape == plain_calls[0].shape and torch.equal(x[:, n:], context)
    assert torch.equal(probe, plain_calls[0]) and torch.equal(gradient[0], plain_calls[0])  # step 0's, unmoved
    assert changed(own[0][:, :n], plain_calls[0][:, :n])  # the pipeline's step 0 gets the moved latents
    assert image.shape == plain_image.shape and changed(image, plain_image)
    assert state(pipe) == before


def test_relocation_with_the_contrast_locator_on_flux_kontext_predicts_with_the_context_tokens():
    """The contrast locator's extra predictions (the prompt with and without each object) get the generated image's
    latents followed by the context image's tokens as the pipeline built them, and read the latents' part of the
    prediction: the relocation acts."""
    family = "FLUX.1 Kontext"
    pipe = pipe_of(family)
    calls = []

    def record(module, args, kwargs):
        calls.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

    m = METHODS["relocation"]
    relocation = m.build(m.config(locator="contrast", read_fraction=0.5), targets=None, layout=LAYOUT)
    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        plain_image = generate(family, [])
        context = calls[0][:, 16:]  # 64²: 16 generated tokens, then the context image's 16
        calls.clear()
        image = generate(family, [relocation])
    finally:
        handle.remove()
    assert len(calls) > 3  # the run's calls and the locator's predictions
    assert all(x.shape[1] == 32 and torch.equal(x[:, 16:], context) for x in calls)
    assert changed(image, plain_image)


def test_the_table_names_columns_and_cells_that_exist():
    assert {c for _, _, works in SUPPORT for c in works.split()} <= set(COLUMNS)
    assert {f for f, _ in BUGS} <= {name for name, _, _ in SUPPORT} and {c for _, c in BUGS} <= set(COLUMNS)


def test_the_readme_matrix_is_the_table():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert support_matrix() in readme, "paste support_matrix() into the README"


def pag(name):
    """The PAG pipeline of a tiny family, perturbing one block's self-attention."""
    from diffusers import (
        PixArtSigmaPAGPipeline,
        SanaPAGPipeline,
        StableDiffusion3PAGPipeline,
        StableDiffusionPAGPipeline,
    )

    if name == "pixart":
        return PixArtSigmaPAGPipeline(**pixart().components, pag_applied_layers=["transformer_blocks.1"])
    if name == "sana":
        return SanaPAGPipeline(**sana().components, pag_applied_layers=["transformer_blocks.1"])
    if name == "unet":
        return StableDiffusionPAGPipeline(**tiny_pipe("unet").components, pag_applied_layers=["mid"])
    components = {k: v for k, v in tiny_pipe("sd3").components.items() if k not in ("image_encoder",
                                                                                    "feature_extractor")}
    return StableDiffusion3PAGPipeline(**components, pag_applied_layers=["transformer_blocks.1"])


@pytest.mark.parametrize("build, kwargs, rows", [
    (pixart, dict(guidance_scale=4.5), [2, (1, 2)]),  # PixArt keeps "do CFG" in a local variable
    (pixart, dict(guidance_scale=1.0), [1, (0, 1)]),
    (lambda: pag("pixart"), dict(guidance_scale=4.5, pag_scale=3.0), [3, (1, 2)]),  # [negative, prompt, perturbed]
    (lambda: pag("pixart"), dict(guidance_scale=1.0, pag_scale=3.0), [2, (0, 1)]),
    (lambda: pag("unet"), dict(guidance_scale=7.5, pag_scale=3.0), [3, (1, 2)]),
    (lambda: pag("sana"), dict(guidance_scale=4.5, pag_scale=3.0), [3, (1, 2)]),
], ids=["PixArt CFG", "PixArt", "PixArt PAG CFG", "PixArt PAG", "SD PAG CFG", "Sana PAG CFG"])
def test_guidance_passes_are_not_conditional(build, kwargs, rows):
    """The negative prompt's rows and PAG's perturbed rows are guidance passes: capture leaves them out (and the
    image is the plain one), Regulation never edits them."""
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=64, width=64, num_inference_steps=2, output_type="latent", **kwargs)
    call.update(PIXART_CALL if "PixArt" in type(pipe).__name__ else SANA_CALL if "Sana" in type(pipe).__name__ else {})
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    passes = Passes()
    with attnctl.apply(pipe, Capture(["dog"]), passes, prompt=PROMPT):
        image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    assert torch.equal(image, plain)
    assert [c[1:3] for c in passes.calls] == [rows, rows]


def test_identical_latents_of_a_pipeline_that_does_not_batch_guidance_are_all_conditional():
    """FLUX names no `do_classifier_free_guidance`; reading the layout from repeated latents is for PixArt's
    pipelines only, so two prompts drawn from the same noise (a common way to compare prompts) are both conditional."""
    pipe = tiny_pipe("flux")
    prompts = [PROMPT, "a grey cat and a red dog"]
    kwargs = call_kwargs("flux", steps=1, output_type="latent")
    noise, _ = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, 64, 64, torch.float32, "cpu",
                                    torch.Generator().manual_seed(0))
    passes = Passes()
    with attnctl.apply(pipe, Capture(["dog"]), passes, prompt=prompts):
        pipe(prompt=prompts, latents=noise.repeat(2, 1, 1), **kwargs)
    assert [c[1:3] for c in passes.calls] == [[2, (0, 2)]]


def test_pag_on_a_site_is_refused_before_anything_changes():
    pipe = pag("sd3")
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(UsageError) as err:
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
            pass
    assert str(err.value) == (
        "StableDiffusion3PAGPipeline applies perturbed-attention guidance to transformer_blocks.1.attn "
        "(pag_applied_layers ['transformer_blocks.1']), replacing its processor during every call, and attnctl "
        "controls that attention; give PAG other layers (`pipe.set_pag_applied_layers([...])`, e.g. ones the method "
        "leaves alone) or use the pipeline without PAG")
    assert dict(pipe.transformer.attn_processors) == before


class MaskProbe(attnctl.Controller):
    """An observer that keeps what each PixArt call shows: its key mask and the probabilities in use."""

    observer = True
    handles_key_mask = True

    def __init__(self):
        self.calls = []

    def __call__(self, call):
        self.calls.append((call.q, call.k, call.scale, call.key_bias, call.text_probs()))


@pytest.mark.parametrize("build, call", [(pixart, PIXART_CALL), (sana, SANA_CALL)], ids=["PixArt", "Sana"])
def test_padding_tokens_are_masked_in_maps_and_never_edited(build, call):
    from attnctl import Regulation

    pipe = build()
    kwargs = {**dict(height=64, width=64, num_inference_steps=2, output_type="latent"), **call}
    for methods in ([], [Regulation(["dog", "cat"], edit_steps=2, iterations=2)]):
        probe = MaskProbe()
        with attnctl.apply(pipe, *methods, probe, prompt=PROMPT):
            pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        assert probe.calls
        for q, k, scale, bias, probs in probe.calls:
            padding = (bias[:, 0, 0] < -1000)[:, None, None, :].expand_as(probs)  # per row: its own text's padding
            assert 0 < int(padding[-1, 0, 0].sum()) < k.shape[2]  # the prompt's tokens, then padding
            assert probs[padding].max() < 1e-6
            if not methods:  # the maps are the masked softmax's (Regulation's rows need not sum to 1: it restores
                # the end token's probability, as the reference does)
                exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale + bias.double(), dim=-1)
                assert (probs.double() - exact).abs().max() < 1e-5


def attention_ids(pipe, run, max_sequence_length):
    """Runs `run` and gives the prompt's token ids in the attention's text sequence, from what the text encoder was
    given first: Sana's pipeline keeps the start token and the last max_sequence_length - 1 (diffusers'
    `select_index`); PixArt's keeps them all."""
    seen = []
    spy = pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        run()
    finally:
        spy.remove()
    ids = seen[0][0]
    return ids[[0, *range(-max_sequence_length + 1, 0)]] if type(pipe).__name__ == "SanaPipeline" else ids


@pytest.mark.parametrize("build, call", [(pixart, PIXART_CALL), (sana, SANA_CALL)], ids=["PixArt", "Sana"])
def test_words_are_found_where_the_pipeline_puts_them(build, call):
    """Both pipelines lowercase and strip the prompt (PixArt's T5 splits "Dog" into three tokens, "dog" is one),
    Sana's puts its instruction before it and keeps the start token, the instruction's last token and the prompt,
    padded on the right though Gemma's tokenizer pads on the left. Checked against the ids the text encoder is
    given: the tokens at the session's positions of "dog" are dog's."""
    pipe = build()
    prompt = "  A Red Dog and a grey cat"
    kwargs = dict(num_inference_steps=1, output_type="latent", **{**dict(height=64, width=64), **call})
    with attnctl.apply(pipe, Capture(["dog"]), prompt=prompt) as session:
        ids = attention_ids(pipe, lambda: pipe(prompt=prompt, **kwargs), call["max_sequence_length"])
        positions = session.prompts[0].word_positions("dog")
        special = session.prompts[0].start_of_text, session.prompts[0].end_of_text  # what Regulation restores
    assert pipe.tokenizer.decode(ids[positions]).strip() == "dog"
    assert pipe.tokenizer.decode(ids[positions[0] - 2 : positions[0]]).strip() != "dog"
    eos = len(pipe.tokenizer(prompt.strip().lower())["input_ids"]) - 1
    assert special == ((0, None) if build is sana else (None, eos))  # Gemma: a start token only; T5: an end token
    assert pipe.tokenizer.convert_ids_to_tokens(int(ids[special[0] if build is sana else special[1]])) == (
        pipe.tokenizer.bos_token if build is sana else pipe.tokenizer.eos_token)


def test_sana_takes_any_instruction():
    """Every instruction leaves the prompt after the instruction's last token, as the default does: one of the
    user's own is fine. An empty one (None, []) moves every word one token earlier, where the session finds them
    (also for a prompt longer than the text, whose mask looks the same either way; more in
    test_family_sana_instruction.py). A negative prompt that holds the prompt is encoded without instruction and not
    taken for the prompt."""
    pipe = sana()
    kwargs = dict(num_inference_steps=1, output_type="latent", **SANA_CALL)
    before = dict(pipe.transformer.attn_processors)
    own = ["Draw exactly what the user asks. User prompt: "]
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
        ids = attention_ids(pipe, lambda: pipe(prompt=PROMPT, complex_human_instruction=own, **kwargs),
                            SANA_CALL["max_sequence_length"])
        assert pipe.tokenizer.decode(ids[session.prompts[0].word_positions("dog")]).strip() == "dog"
    longer = PROMPT + " sitting on the green grass by a river"  # longer than the text: both masks keep 40 tokens
    for prompt, word in ((PROMPT, "dog"), ("d", "d"), (longer, "dog")):  # "d": one token (one byte here)
        steps = Passes()
        with attnctl.apply(pipe, Capture([word]), steps, prompt=prompt) as session:
            ids = attention_ids(pipe, lambda p=prompt: pipe(prompt=p, complex_human_instruction=None, **kwargs),
                                SANA_CALL["max_sequence_length"])
            positions = session.prompts[0].word_positions(word)
        assert pipe.tokenizer.decode(ids[positions]).strip() == word and positions[0] == prompt.index(word) + 1
        assert len(steps.calls) == 1
        assert dict(pipe.transformer.attn_processors) == before
        assert not hasattr(pipe.text_encoder, "_diffusers_hook") and "forward" not in pipe.text_encoder.__dict__
    steps = Passes()
    with attnctl.apply(pipe, Capture(["dog"]), steps, prompt=PROMPT):
        for _ in range(2):  # every pipeline call is checked afresh
            pipe(prompt=PROMPT, negative_prompt=PROMPT + ", blurry", **kwargs)
    assert len(steps.calls) == 2


def test_sana_prompt_embeds_made_without_an_instruction_are_refused():
    """pipe.encode_prompt encodes without an instruction unless given one; a pipeline without a text encoder
    cannot watch the encoding, so the first denoiser call counts the tokens the prompt rows' mask keeps."""
    from attnctl.families.sana import default_instruction

    base = sana()
    pipe = type(base)(**{**base.components, "text_encoder": None})
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=1, output_type="latent", **SANA_CALL)
    plain = base(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    kwargs = dict(prompt=None, negative_prompt=None, **call)

    def embeds(instruction):
        e, m, ne, nm = base.encode_prompt(PROMPT, max_sequence_length=SANA_CALL["max_sequence_length"],
                                          complex_human_instruction=instruction)
        return dict(prompt_embeds=e, prompt_attention_mask=m, negative_prompt_embeds=ne,
                    negative_prompt_attention_mask=nm)

    with pytest.raises(UsageError, match="a prompt text of 25 tokens where the prompt after an instruction has 26"):
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
            pipe(generator=torch.Generator().manual_seed(0), **kwargs, **embeds(None))
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
        image = pipe(generator=torch.Generator().manual_seed(0), **kwargs,
                     **embeds(default_instruction(base).split("\n"))).images
    assert torch.equal(image, plain)


def test_regulation_refuses_a_target_word_the_call_cuts():
    from attnctl import Regulation

    pipe = pixart()  # T5: ▁a ▁red ▁dog ▁and ▁a ▁grey ▁cat </s>; cut to 6, "grey" and "cat" are gone
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="latent",
                  **{**PIXART_CALL, "max_sequence_length": 6})
    with pytest.raises(UsageError, match="'cat' is at token position 6 .* limit of 6 text tokens"):
        with attnctl.apply(pipe, Regulation(["dog", "cat"], edit_steps=2, iterations=2), prompt=PROMPT):
            pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)


def test_chroma_negative_call_is_unconditional_and_the_maps_are_the_masked_softmax():
    """Chroma runs the negative prompt as a second call per step: not conditional, never tuned. Its mask is m_i·m_j
    added to the logits (a float 0/1 tensor in diffusers): the image rows' maps are softmax(S + m_j) exactly, and
    AST's tuned padding text rows are the model's own."""
    pipe = chroma()
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="latent", max_sequence_length=32)
    layout = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
    passes, probe = Passes(), MaskProbe()
    with attnctl.apply(pipe, AST(layout), passes, probe, prompt=PROMPT):
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    tuned = {False, True}  # the schedule leaves some blocks alone
    assert passes.calls == [[0, 1, (0, 1), tuned], [0, 1, (0, 0), {False}],
                            [1, 1, (0, 1), tuned], [1, 1, (0, 0), {False}]]
    plain = MaskProbe()
    with attnctl.apply(pipe, plain, prompt=PROMPT):
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    for q, k, scale, bias, probs in plain.calls:
        n_text = k.shape[2] - 16
        kept = bias[0, 0, 0, :n_text]
        assert bias.dtype == torch.float32 and 0 < int(kept.sum()) < n_text  # the prompt's tokens and one pad
        exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale + bias.double(), dim=-1)
        assert (probs.double() - exact[:, :, n_text:, :n_text]).abs().max() < 1e-6


def test_chroma_padding_text_rows_keep_the_models_attention_under_ast():
    pipe = chroma()
    site = pipe.transformer.transformer_blocks[0].attn
    seen = []
    original = type(site.processor)

    class Spy(attnctl.Controller):
        observer = True
        handles_key_mask = True

        def __call__(self, call):
            if call.site.name == "transformer_blocks.0.attn" and call.step.cond_rows.stop:
                seen.append((call.q, call.k, call.v, call.scale, call.model_mask[0], call.output()))

    layout = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
    kwargs = dict(height=64, width=64, num_inference_steps=1, output_type="latent", max_sequence_length=32)
    every_block = [{"from": 0, "to": 1, "blocks": ["i2i", "i2t", "t2t"], "roles": ["instance", "attribute"]}]
    with attnctl.apply(pipe, AST(layout, schedule=every_block), Spy(), prompt=PROMPT):
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    assert original is type(site.processor) and seen
    q, k, v, scale, mask, out = seen[0]
    n_text = k.shape[2] - 16
    own = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    padded = mask[0, 0, :n_text, n_text] == 0  # text queries whose own mask row is 0: the padding
    assert padded.any() and torch.equal(out[:, :, :n_text][:, :, padded], own[:, :, :n_text][:, :, padded])
    assert (out[:, :, n_text:] - own[:, :, n_text:]).abs().max() > 1e-4  # the image rows are tuned


def test_qwen_image_words_sit_at_their_templated_position_less_the_dropped_tokens():
    """Qwen-Image's pipeline wraps the prompt in a chat template and drops the first 34 tokens of the encoder's
    output: a word's position is found in the templated tokenization, less 34 (the tokenizer's own output, counted
    here a second way). The maps are the softmax in use, exactly; the negative prompt's call ("uncond" context) is
    unconditional."""
    pipe = qwen_image()
    templated = pipe.tokenizer(pipe.prompt_template_encode.format(PROMPT), return_offsets_mapping=True)
    start = pipe.prompt_template_encode.index("{}") + PROMPT.index("dog")
    want = [i - pipe.prompt_template_encode_start_idx for i, (a, b) in enumerate(templated["offset_mapping"])
            if a >= start and b <= start + 3 and b > a]
    assert len(want) == 3  # d, o, g: one byte each
    passes, probe = Passes(), MaskProbe()
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="latent", negative_prompt="a blur",
                  true_cfg_scale=4.0, **QWEN_CALL)
    with attnctl.apply(pipe, passes, probe, prompt=PROMPT) as session:
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        assert session.prompts[0].word_positions("dog") == want
    assert [c[:3] for c in passes.calls] == [[0, 1, (0, 1)], [0, 1, (0, 0)], [1, 1, (0, 1)], [1, 1, (0, 0)]]
    assert probe.calls
    for q, k, scale, bias, probs in probe.calls:
        n_text = k.shape[2] - 64
        logits = (q.double() @ k.double().transpose(-1, -2)) * scale + (0 if bias is None else bias.double())
        exact = torch.softmax(logits, dim=-1)[:, :, n_text:, :n_text]
        assert (probs.double() - exact).abs().max() < 1e-6


def test_the_gradient_forwards_read_masked_text_keys_as_zero_on_sana(monkeypatch):
    """Attend-and-Excite's and binding's maps on Sana (a text padding mask): the padding keys read 0, and each pixel's
    attention over the keys the mask keeps sums to 1, so the maps are the model's own attention."""
    from attnctl.methods.binding import Binding

    seen = []
    original = Binding.image_loss
    monkeypatch.setattr(Binding, "image_loss", lambda self, maps, prompt: seen.append(maps.detach()) or
                        original(self, maps, prompt))
    assert changed(generate("Sana", [controller("binding")], 64), plain("Sana", 64))
    maps = seen[0]
    kept = (maps > 0).all(dim=0).all(dim=0)  # keys some pixel attends: every pixel attends them
    n = int(kept.sum())
    assert 0 < n < maps.shape[-1] and kept[:n].all()  # the padding (on the right) is there, masked
    assert torch.equal(maps[..., n:], torch.zeros_like(maps[..., n:]))
    assert torch.allclose(maps.sum(dim=-1), torch.ones(maps.shape[:2]), atol=1e-5)


def test_sana_sprints_angles_are_read_on_the_0_to_1000_scale():
    """Sana Sprint's SCM scheduler counts TrigFlow angles (π/2 at the start): methods whose schedules read t/1000
    (layout modulation's λ_t, AST's τ) got (1.57/1000)^5 ≈ 1e-14 and changed nothing. Its first step reads 1000."""
    from attnctl.control import Controller

    class Steps(Controller):
        observer = True
        handles_key_mask = True

        def __init__(self):
            self.timesteps = []

        def begin_step(self, step):
            self.timesteps.append(step.timestep)

        def __call__(self, call):
            pass

    steps = Steps()
    generate("Sana Sprint", [steps], 64)
    assert abs(steps.timesteps[0] - 1000.0) < 1e-2 and all(0 <= t <= 1000.01 for t in steps.timesteps)


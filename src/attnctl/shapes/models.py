"""Configurations and builders for the two tiny shapes-world pipelines.

* ``shapes-unet``  -> ``diffusers.StableDiffusionPipeline``  (UNet2DConditionModel, cross-attention)
* ``shapes-mmdit`` -> ``diffusers.StableDiffusion3Pipeline`` (SD3Transformer2DModel, joint attention;
  two small CLIP text encoders, no T5: ``text_encoder_3``/``tokenizer_3`` are ``None``)

Both share one VAE design: a small ``AutoencoderKL`` with 4x downsampling, 64x64 RGB <-> 4x16x16.
Both use a small CLIP-compatible BPE vocabulary in which every shapes-world word is one token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..offline_tokenizers import byte_alphabet
from .data import IMAGE_SIZE, VOCABULARY

LATENT_CHANNELS = 4
VAE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR  # 16
TEXT_MAX_LENGTH = 16  # tokens per prompt (start + words + end + padding)
#: SD3Pipeline pads the (absent) T5 part with this many zero tokens by default; training matches it.
SD3_T5_LENGTH = 256

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, _ = min(pairs)
        if best == 1 << 30:
            break
        a, b = min(p for p in ranks if ranks[p] == best)
        out, k = [], 0
        while k < len(parts):
            if k + 1 < len(parts) and parts[k] == a and parts[k + 1] == b:
                out.append(a + b)
                k += 2
            else:
                out.append(parts[k])
                k += 1
        parts = out
    return tuple(parts)


def build_vocab(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style (vocab, merges): 256 byte symbols, the same with ``</w>``, one token per word.

    Merges are generated so that byte-level BPE reduces each word in ``words`` to the single token
    ``word</w>``; any other text falls back to (merged) characters.
    """
    byte_chars = byte_alphabet()
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        parts = list(_bpe(symbols, ranks))
        while len(parts) > 1:  # join left to right; new merges rank after all earlier ones
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab_list.append(pair[0] + pair[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, [f"{a} {b}" for a, b in merges]


def build_tokenizer(max_length: int = TEXT_MAX_LENGTH):
    """A ``CLIPTokenizer`` over :func:`build_vocab`'s vocabulary, padding with its end token, ``max_length`` long."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=EOS)
    tok.model_max_length = max_length
    return tok


def write_tokenizer_files(folder: str) -> None:
    """vocab.json + merges.txt that ``CLIPTokenizer(vocab_file, merges_file)`` style loaders read."""
    os.makedirs(folder, exist_ok=True)
    vocab, merges = build_vocab()
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


# ----------------------------------------------------------------------------------------------
# Model configs


def text_encoder_config(hidden: int = 64, layers: int = 3, projection: bool = False):
    """The ``CLIPTextConfig`` of a small text encoder over :func:`build_vocab`'s vocabulary, ``hidden`` wide and
    ``layers`` deep, with positions for ``TEXT_MAX_LENGTH`` tokens."""
    from transformers import CLIPTextConfig

    vocab, _ = build_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def build_text_encoder(with_projection: bool = False, hidden: int = 64, layers: int = 3):
    """A freshly initialised CLIP text encoder (``CLIPTextModelWithProjection`` with ``with_projection``, as
    SD3's encoders need for their pooled output)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = text_encoder_config(hidden, layers)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
    scaling_factor=1.0,
)


def build_vae(**overrides):
    """A freshly initialised ``AutoencoderKL`` of ``VAE_CONFIG`` (4x downsampling), with ``overrides`` applied."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' historical name: number of heads
    norm_num_groups=8,
    transformer_layers_per_block=1,
)


def build_unet(**overrides):
    """A freshly initialised ``UNet2DConditionModel`` of ``UNET_CONFIG``, with ``overrides`` applied."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


MMDIT_CONFIG = dict(
    sample_size=LATENT_SIZE,
    patch_size=1,  # 16x16 image tokens: the joint attention AST tunes works on a 16x16 grid
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=128,  # = hidden of text_encoder + text_encoder_2 (64 + 64)
    caption_projection_dim=128,
    pooled_projection_dim=128,
    pos_embed_max_size=LATENT_SIZE,
)


def build_transformer(**overrides):
    """A freshly initialised ``SD3Transformer2DModel`` of ``MMDIT_CONFIG``, with ``overrides`` applied."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**{**MMDIT_CONFIG, **overrides})


def build_unet_scheduler():
    """DPM-Solver++ (2M) over the cosine schedule the UNet is trained with (epsilon prediction).

    "leading" spacing (as in SD 1.x configs): sampling starts at t = 951 (25 or 50 steps).
    Starting at t = 999 ("linspace"/"trailing") fails with this schedule: alpha_bar(999) is 2e-9,
    so the first x0 estimate divides the epsilon error by sqrt(2e-9).
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_flow_scheduler():
    """Flow-matching Euler over 1000 training steps, unshifted: the scheduler ``shapes-mmdit`` samples with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


@dataclass
class PipelineParts:
    """The components of one shapes-world pipeline; ``text_encoder_2`` only for ``shapes-mmdit``."""

    vae: object
    tokenizer: object
    text_encoder: object
    denoiser: object
    text_encoder_2: object = None


def assemble_unet_pipeline(vae, text_encoder, unet, tokenizer=None):
    """A ``StableDiffusionPipeline`` from trained parts, with :func:`build_unet_scheduler` and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer or build_tokenizer(),
        unet=unet,
        scheduler=build_unet_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def assemble_mmdit_pipeline(vae, text_encoder, text_encoder_2, transformer, tokenizer=None):
    """A ``StableDiffusion3Pipeline`` from trained parts: both CLIP encoders share one tokenizer, no T5
    (``text_encoder_3``/``tokenizer_3`` are ``None``), :func:`build_flow_scheduler` for sampling."""
    from diffusers import StableDiffusion3Pipeline

    tok = tokenizer or build_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=build_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def count_parameters(module: torch.nn.Module) -> int:
    """The number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())

"""Families recognised by what their attention is: pipelines on a known denoiser class whose attention is of another
kind are refused before anything changes, with what is supported; FLUX.1 Kontext's context-image tokens are neither
the image nor tuned."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl import AST, Capture, UsageError

from conftest import call_kwargs, run, tiny_pipe


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
        "supported: UNet2DConditionModel with text cross-attention (SD 1.x/2.x, SDXL), SD3Transformer2DModel "
        "(SD3/3.5), FluxTransformer2DModel (FLUX.1); to ask for another, open an issue naming the pipeline class")
    assert dict(pipe.unet.attn_processors) == before and not hasattr(pipe.unet, "_diffusers_hook")

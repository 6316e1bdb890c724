"""SD 1.x/2.x and SDXL: UNet2DConditionModel cross-attention (the `attn2` of each transformer block)."""

from __future__ import annotations

import re

from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import Family, argument

_STAGES = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _forward_order(name: str):
    stage = name.split(".")[0]
    return (_STAGES.get(stage, 3), [int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", name)])


class UNetCrossProcessor:
    """Computes what diffusers' AttnProcessor2_0 computes, with the attention itself done by the session."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self.session.attend(
            self.site, query, key, value, text=slice(0, key.shape[2]), image=slice(0, query.shape[2]),
            mask=attention_mask,
        )

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNetFamily(Family):
    name = "unet"
    denoiser_class = "UNet2DConditionModel"
    known_processors = ("AttnProcessor2_0", "AttnProcessor")

    def discover(self, unet) -> list[AttentionSite]:
        names = sorted(
            (n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False) and n.endswith("attn2")),
            key=_forward_order,
        )
        n_down = len(unet.down_blocks)
        sites = []
        for i, name in enumerate(names):
            parts = name.split(".")
            if parts[0] == "down_blocks":
                stage, level = f"down_blocks.{parts[1]}", int(parts[1])
            elif parts[0] == "up_blocks":
                stage, level = f"up_blocks.{parts[1]}", len(unet.up_blocks) - 1 - int(parts[1])
            else:
                stage, level = parts[0], n_down - 1
            sites.append(AttentionSite(name, self.name, "cross", i, len(names), stage, 2**level, None))
        return sites

    def make_processor(self, site, session):
        return UNetCrossProcessor(site, session)

    def text_segments(self, pipe):
        tokenizer = pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2
        return [TextSegment(tokenizer, 0, tokenizer.model_max_length)]

    def timestep(self, args, kwargs):
        return argument(args, kwargs, "timestep", 1)

    def batch_size(self, args, kwargs):
        return argument(args, kwargs, "sample", 0).shape[0]

    def token_grid(self, denoiser, args, kwargs):
        return tuple(argument(args, kwargs, "sample", 0).shape[-2:])

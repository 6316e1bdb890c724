"""SD 1.x/2.x and SDXL: UNet2DConditionModel cross-attention (the `attn2` of each transformer block)."""

from __future__ import annotations

import re

import torch
from diffusers.image_processor import IPAdapterMaskProcessor

from ..attention import attention
from ..errors import UsageError
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
        return self.compute(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def compute(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_prompt=None):
        """The site's output; `image_prompt(query, batch, head_dim)` (IP-Adapter) gives what is added to the text
        attention's output before the output projection."""
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
        if image_prompt is not None:
            for added in image_prompt(query, batch, head_dim):
                out = out + added
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNetIPAdapterProcessor(UNetCrossProcessor):
    """What diffusers' IPAdapterAttnProcessor2_0 computes: the text attention (done by the session, so methods see
    and change only it) plus, per loaded adapter, a separate attention of the same queries on that adapter's image
    tokens, scaled (and masked with `ip_adapter_masks`). The image tokens are never in the text sequence, so they are
    never targets. The adapter's weights stay in `adapter`, the processor attnctl replaced."""

    def __init__(self, site: AttentionSite, session, adapter):
        super().__init__(site, session)
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None):
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, image_states = encoder_hidden_states
        else:  # diffusers' older calling convention: the image tokens appended to the text
            end = encoder_hidden_states.shape[1] - self.adapter.num_tokens[0]
            encoder_hidden_states, image_states = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
        masks = _adapter_masks(ip_adapter_masks, self.adapter.scale, image_states)

        def image_prompt(query, batch, head_dim):
            adapter = self.adapter
            for states, scale, to_k, to_v, mask in zip(image_states, adapter.scale, adapter.to_k_ip,
                                                       adapter.to_v_ip, masks):
                scales = scale if isinstance(scale, list) else None
                if (all(s == 0 for s in scale) if scales is not None else scale == 0):
                    continue
                images = [None] if mask is None else range(mask.shape[1])
                for i in images:
                    tokens = states if i is None else states[:, i]
                    k, v = (p(tokens).view(batch, -1, attn.heads, head_dim).transpose(1, 2) for p in (to_k, to_v))
                    out = attention(query, k, v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
                    out = out.to(query.dtype)
                    if i is None:
                        yield scale * out
                    else:
                        weight = scales[i] if scales is not None else scale
                        region = IPAdapterMaskProcessor.downsample(mask[:, i], batch, out.shape[1], out.shape[2])
                        yield weight * (out * region.to(dtype=query.dtype, device=query.device))

        return self.compute(attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_prompt)


def _adapter_masks(masks, scales, image_states) -> list:
    """One mask (or None) per loaded adapter, checked as diffusers checks them."""
    if masks is None:
        return [None] * len(scales)
    if not isinstance(masks, list):
        masks = list(masks.unsqueeze(1))
    if not len(masks) == len(scales) == len(image_states):
        raise UsageError(f"ip_adapter_masks has {len(masks)} mask(s) for {len(scales)} loaded IP-Adapter(s) and "
                         f"{len(image_states)} image embedding(s); give one per adapter (None for no mask)")
    for index, (mask, scale, states) in enumerate(zip(masks, scales, image_states)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != states.shape[1]:
            raise UsageError(f"ip_adapter_masks[{index}] must be a tensor [1, images, height, width] with one mask "
                             f"per image of that adapter ({states.shape[1]}); make it with IPAdapterMaskProcessor")
        if isinstance(scale, list) and len(scale) != mask.shape[1]:
            raise UsageError(f"ip_adapter_masks[{index}] has {mask.shape[1]} mask(s) for {len(scale)} scale(s)")
    return masks


class UNetFamily(Family):
    """SD 1.x/2.x and SDXL UNets: a cross site per transformer block's `attn2`, text from the CLIP tokenizer."""

    name = "unet"
    denoiser_class = "UNet2DConditionModel"
    models = "SD 1.x/2.x, SDXL; text cross-attention"
    known_processors = ("AttnProcessor2_0", "AttnProcessor", "IPAdapterAttnProcessor2_0")
    encodes_prompt_as_is = True
    latents_name = "sample"

    def discover(self, unet) -> list[AttentionSite]:
        """The `attn2` cross-attentions in forward order (down, mid, up blocks), each with the stage and downsampling
        (2**level) of the block it sits in."""
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

    def make_processor(self, site, session, original):
        """The IP-Adapter processor where the site had IPAdapterAttnProcessor2_0 (its weights kept), the plain one
        otherwise."""
        if type(original).__name__ == "IPAdapterAttnProcessor2_0":
            return UNetIPAdapterProcessor(site, session, original)
        return UNetCrossProcessor(site, session)

    def text_segments(self, pipe):
        """One segment of `model_max_length` tokens from `tokenizer` (`tokenizer_2` where the pipeline has only that, as
        SDXL's refiner): SDXL joins its two CLIP encoders along features, so the positions are the same."""
        tokenizer = pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2
        return [TextSegment(tokenizer, 0, tokenizer.model_max_length)]

    def timestep(self, args, kwargs):
        """The UNet's `timestep` argument (its second)."""
        return argument(args, kwargs, "timestep", 1)

    def token_grid(self, denoiser, args, kwargs):
        """The latent `sample`'s (height, width): at full resolution a UNet's image token is one latent pixel."""
        return tuple(self.latents(args, kwargs).shape[-2:])

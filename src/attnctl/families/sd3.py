"""SD3 / SD3.5: SD3Transformer2DModel joint attention. The sequence is [image; text]. An IP-Adapter loaded
(`SD3IPAdapterJointAttnProcessor2_0` on every block) is carried: its branch, an attention of the image queries on
the image tokens and the image-prompt tokens, is added to the image stream after the joint attention."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

from ..attention import attention
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import LatentImageFamily, argument, joint_block_sites


def _heads(x, batch, heads, head_dim):
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


def joint_qkv(attn, hidden_states, encoder_hidden_states=None):
    """Query, key and value of an SD3 joint-attention block, as diffusers' JointAttnProcessor2_0 projects and
    normalises them: each (batch, heads, tokens, head_dim) with the image tokens first, then the text tokens when
    `encoder_hidden_states` is given. Returns (query, key, value, number of text tokens).

        query, key, value, n_text = joint_qkv(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(query, key, value)
        image_out, text_out = joint_out(attn, out, hidden_states.shape[1], with_text=True)
    """
    return _joined(attn, *image_qkv(attn, hidden_states), encoder_hidden_states)


def image_qkv(attn, hidden_states):
    """The image tokens' query, key and value as projected, before any norm: each (batch, heads, tokens, head_dim)."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    return tuple(_heads(t, batch, attn.heads, head_dim) for t in (query, key, value))


def _joined(attn, query, key, value, encoder_hidden_states):
    """`joint_qkv` from the image tokens' projections."""
    batch, head_dim = query.shape[0], query.shape[-1]
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    n_text = 0
    if encoder_hidden_states is not None:
        eq, ek, ev = (
            _heads(p(encoder_hidden_states), batch, attn.heads, head_dim)
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        n_text = eq.shape[2]
    return query, key, value, n_text


def joint_out(attn, out, n_image: int, with_text: bool, added=None):
    """The output projections of an SD3 joint-attention block for the attention output `out` (batch, heads, tokens,
    head_dim; image tokens first): the image part through `to_out`; with text, also the text part, through
    `to_add_out` unless the block is `context_pre_only`. Returns the image output, or (image, text) outputs.
    `added`: what to add to the image part before `to_out` (an IP-Adapter's branch), a tensor or None."""
    batch, heads, _, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    if with_text:
        out, text_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
    if added is not None:
        out = out + added
    out = attn.to_out[1](attn.to_out[0](out))
    return (out, text_out) if with_text else out


class SD3JointProcessor:
    """Computes what diffusers' JointAttnProcessor2_0 computes, with the attention done by the session."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        query, key, value, n_text = joint_qkv(attn, hidden_states, encoder_hidden_states)
        n_image = query.shape[2] - n_text
        out = self.session.attend(
            self.site, query, key, value, text=slice(n_image, n_image + n_text), image=slice(0, n_image)
        )
        return joint_out(attn, out.to(query.dtype), n_image, with_text=encoder_hidden_states is not None)


class SD3IPAdapterJointProcessor(SD3IPAdapterJointAttnProcessor2_0):
    """What diffusers' SD3IPAdapterJointAttnProcessor2_0 computes: the joint attention (done by the session) and, where
    the block is given image-prompt tokens (`ip_hidden_states`, which the transformer's `image_proj` makes from
    `ip_adapter_image_embeds` with its timestep embedding `temb`), an attention of the image queries on the image
    tokens and those tokens (its own q/k norms of the projections, the image-prompt tokens normed by `temb`), times
    the adapter's scale, added to the image output before `to_out`. The image-prompt tokens are not in the joint
    sequence, so they are never targets or tuned.

    An instance of diffusers' class, so that the pipeline still sees an active adapter (`is_ip_adapter_active`, which
    decides whether `ip_adapter_image` is encoded, and `set_ip_adapter_scale`), made of the adapter's own layers
    (the same modules under the same names, not new ones); `scale` is the adapter's, read and set there."""

    def __init__(self, site: AttentionSite, session, adapter):
        torch.nn.Module.__init__(self)  # diffusers' __init__ would make new layers: the adapter's are taken instead
        self.__dict__["adapter"] = adapter  # not a submodule: its layers are registered below, under their names
        for name in ("norm_ip", "to_k_ip", "to_v_ip", "norm_q", "norm_k", "norm_ip_k"):
            setattr(self, name, getattr(adapter, name))
        self.site, self.session = site, session

    @property
    def scale(self) -> float:
        """The adapter's scale."""
        return self.adapter.scale

    @scale.setter
    def scale(self, value: float) -> None:
        """Sets the adapter's scale (`pipe.set_ip_adapter_scale` while attached)."""
        self.adapter.scale = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None,
                 temb=None):
        image_q, image_k, image_v = image_qkv(attn, hidden_states)
        query, key, value, n_text = _joined(attn, image_q, image_k, image_v, encoder_hidden_states)
        n_image = query.shape[2] - n_text
        out = self.session.attend(
            self.site, query, key, value, text=slice(n_image, n_image + n_text), image=slice(0, n_image)
        ).to(query.dtype)
        added = None
        if self.scale != 0 and ip_hidden_states is not None:
            batch, heads, _, head_dim = image_q.shape
            normed = self.norm_ip(ip_hidden_states, temb=temb)
            ip_key, ip_value = (_heads(p(normed), batch, heads, head_dim) for p in (self.to_k_ip, self.to_v_ip))
            ip_query = self.norm_q(image_q)
            ip_key = torch.cat([self.norm_k(image_k), self.norm_ip_k(ip_key)], dim=2)
            ip_value = torch.cat([image_v, ip_value], dim=2)
            ip_out = attention(ip_query, ip_key, ip_value).transpose(1, 2).reshape(batch, -1, heads * head_dim)
            added = ip_out.to(ip_query.dtype) * self.scale
        return joint_out(attn, out, n_image, with_text=encoder_hidden_states is not None, added=added)


class SD3Family(LatentImageFamily):
    """SD3/3.5: a joint site per transformer block over [image; text], the text CLIP's tokens then T5's."""

    name = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    models = "SD3/3.5"
    known_processors = ("JointAttnProcessor2_0", "SD3IPAdapterJointAttnProcessor2_0")
    encodes_prompt_as_is = True

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per `transformer_blocks[i].attn`, image tokens first."""
        return joint_block_sites(self.name, transformer, text_first=False)

    def make_processor(self, site, session, original):
        """The IP-Adapter processor where the site had SD3IPAdapterJointAttnProcessor2_0 (its layers kept), the one
        reproducing JointAttnProcessor2_0 otherwise."""
        if type(original).__name__ == "SD3IPAdapterJointAttnProcessor2_0":
            return SD3IPAdapterJointProcessor(site, session, original)
        return SD3JointProcessor(site, session)

    def text_segments(self, pipe):
        """The CLIP tokens (both CLIP encoders' outputs are joined along features: one segment), then, where T5 is
        loaded, 256 T5 tokens after them."""
        clip = pipe.tokenizer
        segments = [TextSegment(clip, 0, clip.model_max_length)]
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            segments.append(TextSegment(pipe.tokenizer_3, clip.model_max_length, 256))
        return segments

    def timestep(self, args, kwargs):
        """The `timestep` argument (the fourth)."""
        return argument(args, kwargs, "timestep", 3)

    def text_len(self, args, kwargs):
        """The text tokens in the joint sequence: the length of `encoder_hidden_states`."""
        return argument(args, kwargs, "encoder_hidden_states", 1).shape[1]

    def guidance_pass(self, args, kwargs) -> bool:
        """SD3.5's skip-layer guidance pass: a call given `skip_layers`."""
        return kwargs.get("skip_layers") is not None  # the pipeline's skip-layer guidance pass

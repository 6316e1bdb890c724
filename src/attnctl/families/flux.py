"""FLUX.1: FluxTransformer2DModel. Double-stream blocks join [text; image] inside the processor; single-stream blocks
get the already joined sequence, whose text length comes from the denoiser's inputs (the step state). Pipelines that
append other image tokens (FLUX.1 Kontext's context image, ids marked 1 in their first coordinate) get
[text; image; context]: the image is the generated image's tokens only (its grid from the ids marked 0), and the
context tokens take part in attention as the model's own keys and queries, neither captured nor tuned."""

from __future__ import annotations

import weakref

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..attention import attention
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import Family, argument


class FluxJointProcessor:
    """Computes what diffusers' FluxAttnProcessor computes, with the attention done by the session."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self.compute(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def compute(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                image_prompt=None):
        """The site's output; with `image_prompt(image_query, image_out)` (IP-Adapter, double blocks) also what the
        block adds to its image stream."""
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        image_query = query
        joint_inside = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint_inside:
            if attn.fused_projections:
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq, ek, ev = (p(encoder_hidden_states) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        n_text = encoder_hidden_states.shape[1] if joint_inside else self.session.step.text_len
        h, w = self.session.step.token_grid  # the generated image's tokens; a context image's (Kontext) follow them
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self.session.attend(
            self.site, q, k, v, text=slice(0, n_text), image=slice(n_text, n_text + h * w), mask=attention_mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            text_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            text_out = attn.to_add_out(text_out.contiguous())
            if image_prompt is not None:
                return out, text_out, image_prompt(image_query, out)
            return out, text_out
        return out


class FluxIPAdapterJointProcessor(FluxJointProcessor):
    """What diffusers' FluxIPAdapterAttnProcessor computes: the joint attention (done by the session) and, per loaded
    adapter, an attention of the image queries on that adapter's image tokens, scaled, returned for the block to add
    to its image stream. The image-prompt tokens are not in the joint sequence, so they are never targets or tuned."""

    def __init__(self, site: AttentionSite, session, adapter):
        super().__init__(site, session)
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None, ip_adapter_masks=None):
        def image_prompt(query, image_out):
            added = torch.zeros_like(image_out)
            for states, scale, to_k, to_v in zip(ip_hidden_states, self.adapter.scale, self.adapter.to_k_ip,
                                                 self.adapter.to_v_ip):
                k, v = (p(states).view(query.shape[0], -1, attn.heads, attn.head_dim) for p in (to_k, to_v))
                out = attention(query.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
                added += scale * out.reshape(query.shape[0], -1, attn.heads * attn.head_dim).to(query.dtype)
            return added

        return self.compute(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                            image_prompt if encoder_hidden_states is not None else None)


class FluxFamily(Family):
    """FLUX.1: joint sites over [text; image] in the double-stream, then the single-stream blocks; text from T5."""

    name = "flux"
    denoiser_class = "FluxTransformer2DModel"
    models = "FLUX.1"
    known_processors = ("FluxAttnProcessor", "FluxIPAdapterAttnProcessor")
    encodes_prompt_as_is = True

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per double-stream block, then one per single-stream block, text first."""
        double = len(transformer.transformer_blocks)
        names = [(f"transformer_blocks.{i}.attn", "double") for i in range(double)]
        single = len(transformer.single_transformer_blocks)
        names += [(f"single_transformer_blocks.{i}.attn", "single") for i in range(single)]
        return [AttentionSite(n, self.name, "joint", i, len(names), stage, 1, True)
                for i, (n, stage) in enumerate(names)]

    def make_processor(self, site, session, original):
        """The IP-Adapter processor where the site had FluxIPAdapterAttnProcessor (its weights kept), the joint one
        otherwise."""
        if type(original).__name__ == "FluxIPAdapterAttnProcessor":
            return FluxIPAdapterJointProcessor(site, session, original)
        return FluxJointProcessor(site, session)

    def text_segments(self, pipe):
        """512 T5 tokens (`tokenizer_2`); the CLIP encoder gives only the pooled embedding."""
        return [TextSegment(pipe.tokenizer_2, 0, 512)]

    def timestep(self, args, kwargs):
        """The `timestep` argument (the fourth) times 1000, back on the scheduler's scale."""
        # the pipeline passes t / 1000; the session reads the scheduler's own timestep for the step
        return argument(args, kwargs, "timestep", 3) * 1000

    def patch_size(self, denoiser) -> int:
        """2: FLUX packs 2x2 latent pixels into one token."""
        return 2  # the pipeline packs 2x2 latent patches into one token

    def token_grid(self, denoiser, args, kwargs):
        """FLUX's image token grid, read from `img_ids` (the generated image's ids only)."""
        return self.ids_grid(argument(args, kwargs, "img_ids", 4))

    def split_latents(self, latents, args, kwargs):
        """The generated image's tokens, which lead the sequence, and the context image's after them (FLUX.1
        Kontext; None without one)."""
        h, w = self.token_grid(None, args, kwargs)
        if latents.shape[1] == h * w:
            return latents, None
        return latents[:, :h * w], latents[:, h * w:]

    _last_ids = (lambda: None, (0, 0))  # (weak reference to the last ids tensor read, its grid)

    def ids_grid(self, ids) -> tuple[int, int]:
        """The grid of the generated image's `ids`, read back from the device once per ids tensor: the pipeline
        passes the same tensor at every step, so later steps read nothing back."""
        seen, grid = self._last_ids
        if seen() is not ids:
            grid = self._grid(ids)
            self._last_ids = (weakref.ref(ids), grid)
        return grid

    @staticmethod
    def _grid(ids) -> tuple[int, int]:
        ids = ids[ids[..., 0] == 0]  # the generated image; FLUX.1 Kontext marks its context image's tokens with 1
        return int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1

    def text_len(self, args, kwargs):
        """The text tokens in the joint sequence: the length of `encoder_hidden_states`."""
        return argument(args, kwargs, "encoder_hidden_states", 1).shape[1]

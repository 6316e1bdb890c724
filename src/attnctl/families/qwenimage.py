"""Qwen-Image: QwenImageTransformer2DModel, joint attention over [text; image] with diffusers'
QwenDoubleStreamAttnProcessor2_0 (RMS-normalised q/k, complex rotary embeddings on both streams, a text padding
mask built from `encoder_hidden_states_mask`). The pipeline wraps the prompt in a chat template and drops the
template's first 34 tokens from the text encoder's output, so a word's position is its templated position less 34
(`TextSegment.template`, `drop`). Classifier-free guidance runs the negative prompt in a second call inside the
denoiser's "uncond" cache context, which the session reads as unconditional. The schedule of AST maps by relative
depth, as for SD3."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import Family, argument, joint_block_sites


class QwenJointProcessor:
    """Computes what diffusers' QwenDoubleStreamAttnProcessor2_0 computes, with the attention done by the session."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 takes the text stream and no external attention_mask")
        mask = None
        if encoder_hidden_states_mask is not None:
            image = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        streams = []
        for states, (to_q, to_k, to_v), (norm_q, norm_k) in (
            (encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
             (attn.norm_added_q, attn.norm_added_k)),
            (hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)),
        ):
            q, k, v = (p(states).unflatten(-1, (-1, head_dim)) for p in (to_q, to_k, to_v))
            q = q if norm_q is None else norm_q(q)
            k = k if norm_k is None else norm_k(k)
            streams.append([q, k, v])
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            for (q_k, freqs) in ((streams[0], text_freqs), (streams[1], image_freqs)):
                q_k[0] = apply_rotary_emb_qwen(q_k[0], freqs, use_real=False)
                q_k[1] = apply_rotary_emb_qwen(q_k[1], freqs, use_real=False)
        n_text, n_image = encoder_hidden_states.shape[1], hidden_states.shape[1]
        q, k, v = (torch.cat([streams[0][i], streams[1][i]], dim=1).transpose(1, 2) for i in range(3))
        out = self.session.attend(self.site, q, k, v, text=slice(0, n_text),
                                  image=slice(n_text, n_text + n_image), mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        text_out, image_out = out[:, :n_text], out[:, n_text:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())


class QwenImageFamily(Family):
    """Qwen-Image: a joint site per transformer block over [text; image], text from a chat-templated prompt."""

    name = "qwenimage"
    denoiser_class = "QwenImageTransformer2DModel"
    models = "Qwen-Image"
    known_processors = ("QwenDoubleStreamAttnProcessor2_0",)

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per `transformer_blocks[i].attn`, text first."""
        return joint_block_sites(self.name, transformer, text_first=True)

    def make_processor(self, site, session, original):
        """The processor reproducing QwenDoubleStreamAttnProcessor2_0."""
        return QwenJointProcessor(site, session)

    def text_segments(self, pipe):
        """`tokenizer_max_length` tokens of the prompt inside the pipeline's chat template, less the template's first
        `prompt_template_encode_start_idx` tokens, which the pipeline drops."""
        return [TextSegment(pipe.tokenizer, 0, pipe.tokenizer_max_length, template=pipe.prompt_template_encode,
                            drop=pipe.prompt_template_encode_start_idx)]

    def timestep(self, args, kwargs):
        """The `timestep` argument (the fourth) times 1000, back on the scheduler's scale."""
        return argument(args, kwargs, "timestep", 3) * 1000  # the pipeline passes t / 1000

    def patch_size(self, denoiser) -> int:
        """2: the pipeline packs 2x2 latent pixels into one token."""
        return 2  # the pipeline packs 2x2 latent patches into one token

    def token_grid(self, denoiser, args, kwargs):
        """The generated image's (rows, columns) of tokens, read from the first entry of `img_shapes`."""
        frames, h, w = argument(args, kwargs, "img_shapes", 4)[0][0]  # the generated image (edit pipelines add more)
        return int(h), int(w)

    def text_len(self, args, kwargs):
        """The text tokens in the joint sequence: the length of `encoder_hidden_states`."""
        return argument(args, kwargs, "encoder_hidden_states", 1).shape[1]

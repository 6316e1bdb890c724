"""Lumina-Image 2.0: Lumina2Transformer2DModel, as Lumina2Pipeline calls it. A single-stream DiT; what departs from the
others:

- the sequence: per row, the caption's tokens that its mask keeps, then the image's tokens, rows of different lengths
  padded at the end and key-masked ((batch, 1, 1, keys), only where the rows' lengths differ): [text; image; pads].
  A row's image starts where its own caption ends, so the rows of one call must hold captions of one length for the
  image to sit at one place (a call with prompts of different token counts is refused; call once per prompt). Sites
  are the main `layers`, of the joint kind with the text first; the refiner blocks before them attend within the
  caption (`context_refiner`) or the image (`noise_refiner`) alone. Keys and values have fewer heads than queries
  (grouped-query attention: repeated per query head, as diffusers' Lumina2AttnProcessor2_0 does).
- the text: Gemma 2's hidden states (the second-to-last layer's) of `system_prompt + " <Prompt Start> " + prompt`,
  tokenized with Gemma's start token, padded on the right (the pipeline sets it) to `max_sequence_length` (256) and
  truncated to it. Only the tokens the mask keeps reach the model, so a word's position is its place in the
  system-prompted text; a word cut by a shorter `max_sequence_length` is refused naming the length it needs. The
  encoding is checked token for token against that text before any step (another prompt or system prompt: refused).
- RoPE: complex `freqs_cis` on three axes (the caption counts along the first, the image's rows and columns along
  the others, all its tokens at the caption's length on the first), applied inside the processor as diffusers does.
- guidance: the negative prompt runs as a second call of each step, after the prompt's (the cond call is every
  step's first); `cfg_trunc_ratio` drops it at the later steps. The timestep is 1 - t/1000.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..errors import UsageError
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import LatentImageFamily, argument
from .flux2 import templated_ids


class Lumina2Processor:
    """Computes what diffusers' Lumina2AttnProcessor2_0 computes at a main layer, with the attention done by the
    session over [caption; image; pads]."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        if base_sequence_length is not None:  # Lumina2TransformerBlock never passes it
            raise ValueError("attnctl reproduces Lumina2AttnProcessor2_0 without proportional attention "
                             "(base_sequence_length)")
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), \
            attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        dtype = query.dtype
        query = query.view(batch, -1, attn.heads, head_dim)
        key, value = key.view(batch, -1, kv_heads, head_dim), value.view(batch, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        repeat = attn.heads // kv_heads
        if repeat >= 1:  # grouped-query attention: each key/value head serves `repeat` query heads
            key = key.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
        mask = None if attention_mask is None else attention_mask.bool().view(batch, 1, 1, -1)
        h, w = self.session.step.token_grid
        n_text = self.session.step.text_len
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self.session.attend(self.site, q, k, v, text=slice(0, n_text), image=slice(n_text, n_text + h * w),
                                  mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class Lumina2Family(LatentImageFamily):
    """Lumina-Image 2.0: a joint site per main layer over [caption; image], text from Gemma 2 after a system
    prompt."""

    name = "lumina2"
    denoiser_class = "Lumina2Transformer2DModel"
    models = "Lumina-Image 2.0"
    known_processors = ("Lumina2AttnProcessor2_0",)
    separate_guidance_calls = True  # the negative prompt's call follows the prompt's, each step

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per main layer (`layers.i.attn`), text first."""
        n = len(transformer.layers)
        return [AttentionSite(f"layers.{i}.attn", self.name, "joint", i, n, "single", 1, True) for i in range(n)]

    def make_processor(self, site, session, original):
        """The processor reproducing Lumina2AttnProcessor2_0."""
        return Lumina2Processor(site, session)

    def text_segments(self, pipe):
        """The prompt's tokens after the pipeline's system prompt and " <Prompt Start> ", Gemma's start token first,
        up to 256 (the pipeline's default max_sequence_length), padded on the right (the pipeline sets it)."""
        return [TextSegment(pipe.tokenizer, 0, 256, template=_template(pipe), padding_side="right")]

    def encoder_check(self, pipe, prompts):
        """(text encoder, check): the encoder's first call of each pipeline call must hold each prompt after the
        system prompt the words were placed for, cut to the call's `max_sequence_length` and padded on the right;
        another prompt or `system_prompt=` moves every word: a UsageError before any step. None without a text
        encoder."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            return None
        segment = self.text_segments(pipe)[0]
        tokenizer = pipe.tokenizer
        wanted = [templated_ids(segment, p.prompt) for p in prompts]
        pad = tokenizer.pad_token_id

        def check(args, kwargs):
            ids = argument(args, kwargs, "input_ids", 0)
            if ids is None or ids.dim() != 2:
                return
            length = ids.shape[1]
            for i, row in enumerate(ids.tolist()):
                want = wanted[i % len(wanted)][:length]
                if row == want + [pad] * (length - len(want)):
                    continue
                shown = tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True)
                raise UsageError(
                    f"{type(pipe).__name__} gave its text encoder {shown!r}, which is not the prompt attnctl.apply "
                    f"was given ({prompts[i % len(prompts)].prompt!r}) after the system prompt the words were placed "
                    "for; pass the same prompt to both, and leave `system_prompt=` out of the call (or set "
                    "pipe.system_prompt before attnctl.apply)")

        return pipe.text_encoder, check

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """The prompt rows' captions are one length (each row's image follows its own caption), the length of the
        prompt after the system prompt, cut to the call's text (embeddings of another prompt, or made another way,
        are refused)."""
        mask = argument(args, kwargs, "encoder_attention_mask", 3)
        lengths = mask[step.cond_rows].sum(dim=1).tolist()
        if len(set(lengths)) > 1:
            raise UsageError(
                f"the Lumina-Image 2.0 pipeline was called with prompts of {len(set(lengths))} different token "
                f"counts ({', '.join(map(str, sorted(set(lengths))))}); each row's image follows its own caption, so "
                "the image tokens sit at a different place in each row, which one attention call cannot address: "
                "call the pipeline once per prompt (or with prompts of one token count)")
        n_text = mask.shape[1]
        for row, length in zip(range(step.cond_rows.start, step.cond_rows.stop), lengths):
            tokens = prompts[min(step.prompt_of_row(row - step.cond_rows.start), len(prompts) - 1)]
            want = min(len(templated_ids(tokens.segments[0], tokens.prompt)), n_text)
            if length != want:
                raise UsageError(
                    f"the Lumina-Image 2.0 pipeline was given a caption of {length} tokens where the prompt "
                    f"{tokens.prompt!r} after the system prompt has {want}: prompt_embeds of another prompt or made "
                    "another way; make them with pipe.encode_prompt(prompt) or pass the prompt itself")

    def timestep(self, args, kwargs):
        """The scheduler's timestep: the pipeline passes 1 - t/1000."""
        return (1 - torch.as_tensor(argument(args, kwargs, "timestep", 1))) * 1000

    def text_len(self, args, kwargs):
        """The caption tokens before the image in the call's first row: what its mask keeps."""
        return int(argument(args, kwargs, "encoder_attention_mask", 3)[0].sum())


def _template(pipe) -> str:
    """The text the pipeline encodes, "…{}…": its system prompt, " <Prompt Start> ", the prompt."""
    if "{}" in pipe.system_prompt:
        raise UsageError("the pipeline's system_prompt holds \"{}\", where attnctl marks the prompt's place; set "
                         "pipe.system_prompt to a text without it")
    return pipe.system_prompt + " <Prompt Start> {}"

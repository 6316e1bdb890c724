"""HiDream-I1: HiDreamImageTransformer2DModel, as HiDreamImagePipeline calls it. What departs from the others:

- the text: four encoders. The two CLIPs give only a pooled vector (added to the timestep embedding, no tokens).
  T5's last hidden states and Llama 3.1's hidden states of every layer reach the attention: each block sees
  [T5; Llama (the last of `llama_layers`, a stream carried through the blocks); Llama (the layer `llama_layers`
  names for this block, new at each block)], each padded to `max_sequence_length` (128) on its tokenizer's side (T5 and
  Llama: the right; Llama pads with its end-of-turn token) and truncated to it. No text mask: padding tokens are keys
  like the prompt's. A prompt word therefore has three places in the text, one in T5's tokens and two in Llama's
  (`text_segments`). The Llama tokens' place follows T5's length, so words are placed for the pipeline's default
  `max_sequence_length`; a call with another is refused before any step (`check_text_layout`). The T5 and Llama
  encodings are checked token for token against the prompt `apply` was given (`encoder_check`).
- the sequence: image first, [image; text], in both kinds of block: double-stream blocks
  (`double_stream_blocks.i.block.attn1`) project the image and the text with their own weights and join them inside
  the processor; single-stream blocks (`single_stream_blocks.i.block.attn1`) get the joined sequence, whose text part
  is the call's last `text_len` tokens. A non-square image is padded to the model's `max_seq` tokens and its pad
  tokens' keys are multiplied by the model's mask (zeroed), not masked out: they stay keys and queries of the model's
  own between the image and the text, like Z-Image's image pads.
- RoPE: a (cos, sin) rotation matrix per token on three axes (the image's rows and columns; the text at 0), applied to
  the whole head or its first half (where the head is twice the rotary width), inside the processor as diffusers does.
- the pipeline scales every requested size to the area of `default_sample_size` latents squared (1024² for
  HiDream-I1), keeping the aspect ratio: the token grid is read from the latents of each call.
- guidance: batched [negative, prompt] (`do_classifier_free_guidance`), the default layout.
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers.models.transformers.transformer_hidream_image import apply_rope

from ..errors import UsageError
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import LatentImageFamily, argument

MAX_SEQUENCE_LENGTH = 128  # HiDreamImagePipeline's default: T5's and Llama's tokens each


class HiDreamProcessor:
    """Computes what diffusers' HiDreamAttnProcessor computes (a double- or single-stream block), with the attention
    done by the session over [image; image pads; text]."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, hidden_states_masks=None, encoder_hidden_states=None,
                 image_rotary_emb=None):
        dtype, batch = hidden_states.dtype, hidden_states.shape[0]
        query, key, value = _heads(attn, hidden_states, dtype, attn.to_q, attn.to_k, attn.to_v, attn.q_rms_norm,
                                   attn.k_rms_norm)
        if hidden_states_masks is not None:  # a non-square image's pad tokens: their keys zeroed, as the model does
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        n_image = query.shape[1]
        if not attn.single:
            text = _heads(attn, encoder_hidden_states, dtype, attn.to_q_t, attn.to_k_t, attn.to_v_t, attn.q_rms_norm_t,
                          attn.k_rms_norm_t)
            query, key, value = (torch.cat([i, t], dim=1) for i, t in zip((query, key, value), text))
        else:
            n_image -= self.session.step.text_len
        if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
            query, key = apply_rope(query, key, image_rotary_emb)
        else:  # the rotary width is half the head: the first half of each head is rotated
            (q1, q2), (k1, k2) = query.chunk(2, dim=-1), key.chunk(2, dim=-1)
            q1, k1 = apply_rope(q1, k1, image_rotary_emb)
            query, key = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
        h, w = self.session.step.token_grid
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self.session.attend(self.site, q, k, v, text=slice(n_image, query.shape[1]), image=slice(0, h * w))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        image_out, text_out = out.split_with_sizes([n_image, out.shape[1] - n_image], dim=1)
        return attn.to_out(image_out), attn.to_out_t(text_out)


def _heads(attn, states, dtype, to_q, to_k, to_v, norm_q, norm_k):
    """q, k, v of `states` (batch, tokens, heads, head_dim): q and k RMS-normed and cast to `dtype` (the image
    stream's), as HiDreamAttnProcessor projects them."""
    batch = states.shape[0]
    query, key, value = norm_q(to_q(states)).to(dtype), norm_k(to_k(states)).to(dtype), to_v(states)
    head_dim = key.shape[-1] // attn.heads
    return tuple(t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))


class HiDreamFamily(LatentImageFamily):
    """HiDream-I1: a joint site per double-stream block, then per single-stream block, over [image; T5; Llama;
    Llama]."""

    name = "hidream"
    denoiser_class = "HiDreamImageTransformer2DModel"
    models = "HiDream-I1"
    known_processors = ("HiDreamAttnProcessor",)

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per double-stream block, then one per single-stream block, image first."""
        names = [(f"double_stream_blocks.{i}.block.attn1", "double")
                 for i in range(len(transformer.double_stream_blocks))]
        names += [(f"single_stream_blocks.{i}.block.attn1", "single")
                  for i in range(len(transformer.single_stream_blocks))]
        return [AttentionSite(n, self.name, "joint", i, len(names), stage, 1, False)
                for i, (n, stage) in enumerate(names)]

    def make_processor(self, site, session, original):
        """The processor reproducing HiDreamAttnProcessor."""
        return HiDreamProcessor(site, session)

    def text_segments(self, pipe):
        """T5's tokens (`tokenizer_3`), then Llama's (`tokenizer_4`) twice: the carried stream, then the block's own
        layer; each as long as the pipeline's default max_sequence_length (128) lets it be."""
        t5, llama = _tokenizers(pipe)
        n5 = min(MAX_SEQUENCE_LENGTH, t5.model_max_length)
        n4 = min(MAX_SEQUENCE_LENGTH, llama.model_max_length)
        return [TextSegment(t5, 0, n5), TextSegment(llama, n5, n4), TextSegment(llama, n5 + n4, n4)]

    def encoder_check(self, pipe, prompts):
        """[(T5, check), (Llama, check)]: each encoder's first call of a pipeline call must hold the prompts `apply`
        was given, tokenized as the pipeline tokenizes them (padded and cut to the call's length); another prompt
        (`prompt_3=`, `prompt_4=`, or another `prompt`) is a UsageError before any step. Only the encoders a pipeline
        has are checked."""
        t5, llama = _tokenizers(pipe)
        pairs = [(getattr(pipe, "text_encoder_3", None), t5, "T5 (text_encoder_3, prompt_3)"),
                 (getattr(pipe, "text_encoder_4", None), llama, "Llama (text_encoder_4, prompt_4)")]
        return [(encoder, _encoding_check(pipe, tokenizer, prompts, which))
                for encoder, tokenizer, which in pairs if encoder is not None]

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """T5's and Llama's tokens are as many as the words were placed for (the pipeline's default
        max_sequence_length): the Llama tokens follow T5's, so another length moves every Llama word."""
        segments = prompts[0].segments
        n5, n4 = _text_lengths(args, kwargs)
        if (n5, n4) != (segments[0].length, segments[1].length):
            raise UsageError(
                f"the HiDream-I1 pipeline gave its denoiser {n5} T5 and {n4} Llama tokens per prompt, where attnctl "
                f"places the prompt's words for {segments[0].length} and {segments[1].length} (max_sequence_length="
                f"{MAX_SEQUENCE_LENGTH}, the pipeline's default): HiDream lays T5's tokens and Llama's side by side, "
                "so another length moves every Llama token; call the pipeline with max_sequence_length="
                f"{MAX_SEQUENCE_LENGTH} (or leave it out), and make prompt embeddings with it")

    def timestep(self, args, kwargs):
        """The `timesteps` argument: the scheduler's timestep, as the pipeline passes it."""
        return argument(args, kwargs, "timesteps", 1)

    def token_grid(self, denoiser, args, kwargs):
        """The latents' (rows, columns) over the patch size. A call with arguments the denoiser does not take (a
        method running the denoiser itself, as other denoisers take their inputs: `timestep`, text states batched
        along their first dimension) is a UsageError before it runs, and so are latents given patchified (with
        `hidden_states_masks`, which the pipeline never does): attnctl reads the grid from (batch, channels, height,
        width) latents."""
        unknown = sorted(set(kwargs) - set(_forward_parameters(type(denoiser))))
        if unknown:
            raise UsageError(
                f"{type(denoiser).__name__} was called with {', '.join(unknown)}, which it does not take (it takes "
                "`timesteps`, and its Llama states stacked per layer, batched along their second dimension): a "
                f"method that runs the denoiser itself cannot run on {self.models}; the methods that act on the "
                "attention of the pipeline's own denoiser calls can")
        latents = argument(args, kwargs, "hidden_states", 0)
        if latents.dim() != 4:
            raise UsageError(
                f"{type(denoiser).__name__} was called with latents of shape {tuple(latents.shape)}, patchified "
                "already; attnctl reads HiDream-I1's token grid from (batch, channels, height, width) latents, as "
                "HiDreamImagePipeline passes them: call the pipeline, or the denoiser with such latents")
        return super().token_grid(denoiser, args, kwargs)

    def text_len(self, args, kwargs):
        """The text tokens each block sees: T5's, then Llama's twice."""
        n5, n4 = _text_lengths(args, kwargs)
        return n5 + 2 * n4


@functools.cache
def _forward_parameters(cls) -> tuple[str, ...]:
    """The names `cls.forward` takes."""
    return tuple(inspect.signature(cls.forward).parameters)


def _tokenizers(pipe):
    """The pipeline's T5 and Llama tokenizers; a UsageError where one is missing."""
    t5, llama = getattr(pipe, "tokenizer_3", None), getattr(pipe, "tokenizer_4", None)
    if t5 is None or llama is None:
        raise UsageError(
            f"{type(pipe).__name__} has no {'tokenizer_3 (T5)' if t5 is None else 'tokenizer_4 (Llama)'}, whose "
            "tokens attnctl places the prompt's words by; load the pipeline with both tokenizers")
    return t5, llama


def _text_lengths(args, kwargs) -> tuple[int, int]:
    """(T5 tokens, Llama tokens) of a denoiser call: the lengths of its T5 states and of each Llama layer's."""
    t5 = argument(args, kwargs, "encoder_hidden_states_t5", 2)
    llama = argument(args, kwargs, "encoder_hidden_states_llama3", 3)
    return t5.shape[1], llama[0].shape[1]


def _encoding_check(pipe, tokenizer, prompts, which: str):
    """A check of an encoder's first call: each row is the prompt's tokenization as the pipeline makes it (special
    tokens added, padded to the row's length and cut to it)."""
    wanted: dict[int, list[list[int]]] = {}

    def check(args, kwargs):
        ids = argument(args, kwargs, "input_ids", 0)
        if ids is None or ids.dim() != 2:
            return
        length = ids.shape[1]
        if length not in wanted:
            wanted[length] = [list(tokenizer(p.prompt, padding="max_length", max_length=length, truncation=True,
                                             add_special_tokens=True)["input_ids"]) for p in prompts]
        for i, row in enumerate(ids.tolist()):
            if row == wanted[length][i % len(prompts)]:
                continue
            shown = tokenizer.decode(row, skip_special_tokens=True)
            raise UsageError(
                f"{type(pipe).__name__} gave its {which} encoder {shown!r}, which is not the prompt attnctl.apply was "
                f"given ({prompts[i % len(prompts)].prompt!r}), whose words the methods act on; pass the same prompt "
                "to both, and leave prompt_3 and prompt_4 out (or equal to it)")

    return check

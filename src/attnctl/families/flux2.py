"""FLUX.2: Flux2Transformer2DModel, as Flux2Pipeline ([dev]) and Flux2KleinPipeline ([klein]) call it.

What departs from FLUX.1:
- the blocks: double-stream blocks (`transformer_blocks.i.attn`, diffusers' Flux2AttnProcessor) join [text; image]
  inside the processor, as FLUX.1's do; single-stream blocks (`single_transformer_blocks.i.attn`,
  Flux2ParallelSelfAttnProcessor) compute q, k, v and the MLP input from one fused projection and return attention
  and MLP through one output projection. Rotary embeddings on four axes (t, h, w, l); the text tokens count along l.
  No attention mask: the text's padding tokens are attended like the prompt's.
- the text: one chat model's hidden states (three layers stacked). [dev] wraps the prompt in Mistral 3's chat
  template after a system message (`pipe.system_message`), tokenized without added special tokens (the template
  writes <s>); [klein] in Qwen3's template with thinking switched off. The text is padded to `max_sequence_length`
  on the tokenizer's side: on the right, a word's position is its templated position for any length; on the left,
  the prompt ends at the text's end, so the layout holds for the length `text_segments` places it for (the
  pipeline's default, 512) only. The prompt's encoding is checked token for token against that layout before any
  step (`encoder_check`), which also refuses a prompt longer than the template leaves room for.
- guidance: [dev] embeds it (one call per step); [klein] runs the negative prompt as a second call in diffusers'
  "uncond" cache context.
- latents: the denoiser takes them packed (batch, tokens, channels); the pipelines take (batch, channels, height,
  width) patchified latents as their `latents` argument, which `latents` gives (the generated image's tokens, not a
  reference image's, FLUX.2's editing input, whose ids count time from 10 on).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..errors import UsageError
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import Family, argument
from .flux import FluxFamily

SENTINEL = "\u2063attnctl-prompt\u2063"  # stands for the prompt while the chat template is rendered


class Flux2JointProcessor:
    """Computes what diffusers' Flux2AttnProcessor computes (a double-stream block), with the attention done by the
    session."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if joint:
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if joint:
                eq, ek, ev = (p(encoder_hidden_states) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        n_text = 0
        if joint:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
            n_text = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = _attend(self.session, self.site, query, key, value, n_text, attention_mask)
        if encoder_hidden_states is not None:
            text_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                                  out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text_out) if encoder_hidden_states is not None else out


class Flux2SingleProcessor:
    """Computes what diffusers' Flux2ParallelSelfAttnProcessor computes (a single-stream block over the joined
    [text; image] sequence: attention and MLP in parallel), with the attention done by the session."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = _attend(self.session, self.site, query, key, value, self.session.step.text_len, attention_mask)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def _attend(session, site, query, key, value, n_text: int, mask):
    """The session's attention over [text; image; reference image] for q, k, v laid out (batch, tokens, heads,
    head_dim), back in that layout with the heads flattened: what diffusers' dispatch_attention_fn returns."""
    h, w = session.step.token_grid  # the generated image's tokens; a reference image's follow them
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = session.attend(site, q, k, v, text=slice(0, n_text), image=slice(n_text, n_text + h * w), mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class _ChatTokens:
    """A tokenizer that encodes as a chat template's tokenization does: without the special tokens it would add
    (Mistral's <s>; the rendered template writes its own). Everything else is the tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        return self._tokenizer(text, **{**kwargs, "add_special_tokens": False})

    def __getattr__(self, name):
        if name == "_tokenizer":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


def chat_template(tokenizer, messages, **options) -> str:
    """The pipeline's text around its prompt, "…{}…": `messages` (holding `SENTINEL` where the prompt goes) rendered
    by the tokenizer's (or processor's) chat template with `options`, the prompt's place marked "{}"."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    rendered = rendered[0] if isinstance(rendered, list) else rendered
    if rendered.count(SENTINEL) != 1 or "{}" in rendered:
        raise UsageError(f"{type(tokenizer).__name__}'s chat template does not hold the prompt once as given, so "
                         "attnctl cannot place its words; use the model's own tokenizer and chat template")
    return rendered.replace(SENTINEL, "{}")


def text_tokenizer(tokenizer):
    """The tokenizer inside a processor (Mistral 3's PixtralProcessor), or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def templated_ids(segment: TextSegment, prompt: str) -> list[int]:
    """The token ids the pipeline gives its text encoder for `prompt` inside the segment's template, before padding
    and truncation."""
    before, _, after = segment.template.partition("{}")
    return list(segment.tokenizer(before + prompt + after, truncation=False)["input_ids"])


def chat_encoder_check(pipe, segment: TextSegment, prompts, where: str, padded: bool, *, tokenizer=None,
                       left: bool | None = None, truncated: bool = True,
                       remedy: str = "pass the same prompt to both (and leave the pipeline's template, system message "
                                     "and caption upsampling as they were when apply was entered)"):
    """(text encoder, check) for a pipeline that encodes each prompt inside a chat template, padded to the call's
    `max_sequence_length` L and truncated to it: the encoder's first call of a pipeline call must hold, per prompt row,
    the prompt's templated tokens, all of them (else the prompt is longer than the template leaves room for: a
    UsageError naming the length it needs), in the places `segment` gives them (`padded`: the padding is part of the
    sequence the denoiser sees, so on the left the layout holds for L = the segment's length only). `tokenizer` (or
    the processor holding it) and `left`: what the pipeline encodes with and the side it pads (by default
    `pipe.tokenizer` and its padding side); `truncated=False`: the pipeline pads to the longest prompt and cuts none
    (Qwen-Image 2.1); `remedy`: the message's fix for another prompt."""
    tokenizer = text_tokenizer(pipe.tokenizer if tokenizer is None else tokenizer)
    wanted = [templated_ids(segment, p.prompt) for p in prompts]
    pad = tokenizer.pad_token_id
    left = getattr(tokenizer, "padding_side", "right") == "left" if left is None else left

    def check(args, kwargs):
        ids = argument(args, kwargs, "input_ids", 0)
        if ids is None or ids.dim() != 2:
            return
        length = ids.shape[1]
        for i, row in enumerate(ids.tolist()):
            want, prompt = wanted[i % len(wanted)], prompts[i % len(prompts)].prompt
            if len(want) > length and truncated:
                raise UsageError(
                    f"the prompt {prompt!r} takes {len(want)} tokens inside {where}, more than the "
                    f"{length} (max_sequence_length) the pipeline was called with: the template's closing tokens "
                    f"and the prompt's end are cut, so the model is given a broken template; shorten the prompt or "
                    f"call with max_sequence_length={len(want)} or more")
            padding = [pad] * (length - len(want))
            if row == (padding + want if left else want + padding):
                if padded and segment.pads_left() and length != segment.length:
                    raise UsageError(
                        f"{type(pipe).__name__}'s tokenizer pads on the left, so the prompt's tokens end at the "
                        f"text's last position, which moves with max_sequence_length; attnctl places them for "
                        f"max_sequence_length={segment.length} (the pipeline's default), and the pipeline was called "
                        f"with {length}: call it with max_sequence_length={segment.length}")
                continue
            shown = tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True)
            raise UsageError(
                f"{type(pipe).__name__} gave its text encoder {shown!r}, which is not the prompt attnctl.apply was "
                f"given ({prompt!r}) inside {where}; {remedy}")

    return pipe.text_encoder, check


class Flux2Family(Family):
    """FLUX.2 [dev] and [klein]: joint sites over [text; image] in the double-stream blocks, then the single-stream
    blocks; text from a chat model's template."""

    name = "flux2"
    denoiser_class = "Flux2Transformer2DModel"
    models = "FLUX.2 [dev]/[klein]"
    known_processors = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")
    separate_guidance_calls = True  # [klein]: the negative prompt's call follows the prompt's ("uncond" context)

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per double-stream block, then one per single-stream block, text first."""
        names = [(f"transformer_blocks.{i}.attn", "double") for i in range(len(transformer.transformer_blocks))]
        names += [(f"single_transformer_blocks.{i}.attn", "single")
                  for i in range(len(transformer.single_transformer_blocks))]
        return [AttentionSite(n, self.name, "joint", i, len(names), stage, 1, True)
                for i, (n, stage) in enumerate(names)]

    def make_processor(self, site, session, original):
        """The processor reproducing Flux2ParallelSelfAttnProcessor (single-stream sites) or Flux2AttnProcessor."""
        if type(original).__name__ == "Flux2ParallelSelfAttnProcessor":
            return Flux2SingleProcessor(site, session)
        return Flux2JointProcessor(site, session)

    def text_segments(self, pipe):
        """`tokenizer_max_length` (512) tokens of the prompt in the pipeline's chat template: Mistral 3's after the
        system message ([dev], tokenized without added special tokens), or Qwen3's with thinking off ([klein])."""
        tokenizer = text_tokenizer(pipe.tokenizer)
        length = getattr(pipe, "tokenizer_max_length", 512)
        if hasattr(pipe, "system_message"):  # Flux2Pipeline: format_input's messages, tokenized as its template is
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            template = chat_template(pipe.tokenizer, format_input([SENTINEL], system_message=pipe.system_message),
                                     add_generation_prompt=False)
            return [TextSegment(_ChatTokens(tokenizer), 0, length, template=template)]
        template = chat_template(tokenizer, [{"role": "user", "content": SENTINEL}], add_generation_prompt=True,
                                 enable_thinking=False)
        return [TextSegment(tokenizer, 0, length, template=template)]

    def encoder_check(self, pipe, prompts):
        """The prompts' encoding, checked token for token against where `text_segments` puts them (see
        `chat_encoder_check`); None without a text encoder."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            return None
        return chat_encoder_check(pipe, self.text_segments(pipe)[0], prompts, "FLUX.2's chat template", padded=True)

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """Text embeddings given without the prompt (`prompt_embeds`) padded on the left to another length than the
        one words are placed for are refused."""
        segment = prompts[0].segments[0]
        n_text = self.text_len(args, kwargs)
        if segment.pads_left() and n_text != segment.length:
            raise UsageError(
                f"the FLUX.2 pipeline was given {n_text} text tokens padded on the left, where attnctl places the "
                f"prompt's tokens at the end of {segment.length}; make the embeddings with "
                f"max_sequence_length={segment.length} (or pass the prompt itself)")

    def timestep(self, args, kwargs):
        """The `timestep` argument (the third) times 1000, back on the scheduler's scale."""
        return argument(args, kwargs, "timestep", 2) * 1000  # the pipelines pass t / 1000

    def patch_size(self, denoiser) -> int:
        """2: the pipelines patchify 2x2 latent pixels into one token."""
        return 2

    def token_grid(self, denoiser, args, kwargs):
        """The generated image's token grid, read from `img_ids` (time 0; a reference image's ids count from 10).
        The denoiser given latents other than packed ones (the pipeline's own, by a method running the denoiser
        itself) is a UsageError: it cannot take them."""
        latents = self.latents_argument(args, kwargs)
        if latents.dim() != 3:
            raise UsageError(
                f"{type(denoiser).__name__} takes its latents packed, one row per image token (batch, tokens, "
                f"channels), and was called with latents of shape {tuple(latents.shape)}, the pipeline's layout: a "
                f"method that runs the denoiser itself on the pipeline's latents cannot run on {self.models}; the "
                "methods that act on the attention of the pipeline's own denoiser calls can")
        return FluxFamily._grid(argument(args, kwargs, "img_ids", 3))

    def latents_argument(self, args, kwargs) -> torch.Tensor:
        """The denoiser call's `hidden_states`, as given."""
        return argument(args, kwargs, "hidden_states", 0)

    def latents(self, args, kwargs):
        """The generated image's latents as the pipelines take them (`latents=`): (batch, channels, rows, columns),
        unpacked from the denoiser's packed `hidden_states` (a reference image's tokens left out)."""
        packed = self.latents_argument(args, kwargs)
        if packed.dim() != 3:
            return packed
        h, w = FluxFamily._grid(argument(args, kwargs, "img_ids", 3))
        return packed[:, : h * w].transpose(1, 2).unflatten(2, (h, w))

    def text_len(self, args, kwargs):
        """The text tokens in the joint sequence: the length of `encoder_hidden_states`."""
        return argument(args, kwargs, "encoder_hidden_states", 1).shape[1]

"""Qwen-Image 2.1: QwenImage21Transformer2DModel, as QwenImage21Pipeline calls it. It shares nothing with Qwen-Image's
family; what departs from the others:

- the sequence: one stream per row, [text; image], block-causal: the text attends causally (each token to itself and
  the tokens before it), the image to every text token and to itself, both ways. Padding text keys (prompts of
  different lengths in one call) are masked. Sites are `transformer_blocks.i.attn`, of the joint kind with the text
  first. The model's own processor (QwenImage21AttnProcessor) computes the prefill as one attention per text segment
  (a causal triangle) and one for the image's queries alone over every key; ours computes it the same way, and the
  image's rows so at every step (`own` of `Session.attend`): on CUDA a fused kernel's result for a row may depend on
  how many query rows the call has (flash attention splits the keys where the rows are too few to fill the GPU;
  cuDNN plans per shape), so the image's rows of one attention over [text; image] need not be the model's bit for
  bit (on the CPU they are).
- the KV cache: the text is modulated from t = 0, so its keys and values do not change with the step; the pipeline
  computes them at the first step only (`kv_cache_mode="extract"`, the prefill) and later steps compute the image's
  queries alone, attending over the cached text keys and values (`"cached"`). The image→text attention is there at
  every step; the text→text attention only at the prefill. What a site gives the session is the whole sequence at
  every step: at cached steps the text's queries are the prefill's (kept beside the model's cache, as its keys and
  values are), so each call shows the image→text and image→image attention the model computes at that step.
  Methods act on the image's rows: the text's rows keep the model's causal attention (a method's output for them is
  replaced by the model's own), so a method's text→text change does not act here: the text rows are causal and
  cached, and a change at the prefill would stay in the cache for every step. The text rows' unchanged output is the
  prefill's at every step (kept with its queries: the model computes none at cached steps, and neither do we).
- the text: Qwen3-VL's hidden states of `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}
  <|im_end|>\\n<|im_start|>assistant\\n` (the pipeline's t2i template, rendered as text and tokenized by the
  processor), padded on the left for the encoder; the pipeline keeps the tokens the mask keeps and drops the system
  message's tokens (`_drop_idx`), then pads the rows on the right. A word's position is its templated position less
  the dropped tokens. The encoder's input is checked token for token before any step (another prompt or template:
  refused). Condition images (`image=`) interleave their tokens with the text: refused, naming text-to-image.
- RoPE: complex, three axes (the text counts along all three, the image from where the text ends), rotated inside
  the processor as diffusers does. Guidance: the negative prompt runs as a second call in the "uncond" cache context,
  with its own KV cache; the pipeline says nothing of it, so where its encoder runs once (the prompt given as
  prompt_embeds, the negative prompt as text) the denoiser's text tells whose encoding that was
  (`lone_encoding_is_prompts`). The timestep is t/1000; latents are packed (batch, tokens, channels), one token per
  16x16 pixels, and the pipeline floors the size to multiples of 32 (`size_step`).
- forwards attnctl runs itself (a gradient forward over the latents, an extra prediction for another prompt) are
  given the pipeline's call without its KV cache (`replay_arguments`): they compute the text themselves, for the rows
  and the prompt they run, and leave the pipeline's cache as it was; their prediction covers the whole sequence, the
  image's at its end (`latents_prediction`).
"""

from __future__ import annotations

import weakref

import torch
from diffusers.models.transformers.transformer_qwenimage21 import apply_rotary_emb_qwen

from ..attention import attention
from ..errors import UsageError
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import Family, argument
from .flux2 import chat_encoder_check, text_tokenizer

TEXT_LIMIT = 8192  # the transformer's rotary table: 8192 positions for the text and the images together
CACHE_ARGUMENTS = ("kv_cache", "kv_cache_mode")


class QwenImage21Processor:
    """Computes what diffusers' QwenImage21AttnProcessor computes at a block: the text's rows causally per segment at
    the prefill (not at all at cached steps), the image's queries alone over every key, that attention done by the
    session over [text; image] (the image's rows of its output are used)."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session
        # per layer cache of the pipeline's run: the text's queries and attention output at its prefill (the model
        # keeps only the keys and values)
        self._prefill: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        head_dim = attn.inner_dim // attn.heads
        query, key, value = (p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query).to(value.dtype), attn.norm_k(key).to(value.dtype)
        if rotary_emb is not None:
            query = apply_rotary_emb_qwen(query, rotary_emb, use_real=False)
            key = apply_rotary_emb_qwen(key, rotary_emb, use_real=False)
        cached = layer_cache is not None and kv_cache_mode == "cached"
        prefill = layer_cache is not None and kv_cache_mode == "extract" and cache_write_slice is not None
        if cached:  # the image's queries alone: the text's keys and values come from the cache
            if layer_cache not in self._prefill:
                raise UsageError(
                    f"{self.site.name}: the Qwen-Image 2.1 denoiser was called with a KV cache that attnctl did not "
                    "see filled (its prefill ran before attnctl.apply was entered); start the pipeline call inside "
                    "`with attnctl.apply(...)`, or call it with use_kv_cache=False")
            text_queries, text_out = self._prefill[layer_cache]
            cached_k, cached_v = layer_cache.get()
            query = torch.cat([text_queries, query], dim=1)
            key, value = torch.cat([cached_k, key], dim=1), torch.cat([cached_v, value], dim=1)
            mask = attention_mask  # the padding keys' mask, (batch, 1, 1, keys), or None
            n_text = text_queries.shape[1]
        else:  # the prefill, with its text segments (the model passes them wherever a processor is not the flex one)
            mask = None if key_valid is None else key_valid[:, None, None, :]
            if prefill:
                layer_cache.store(key[:, cache_write_slice].clone(), value[:, cache_write_slice].clone())
            n_text = segments[-1][1] if segments else 0
        h, w = self.session.step.token_grid
        if query.shape[1] - n_text != h * w:
            raise ValueError(f"{self.site.name}: {query.shape[1] - n_text} image tokens after {n_text} text tokens, "
                             f"where the call's image has {h}x{w}")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        image_q = q[:, :, n_text:]  # as the model's own attention for the image reads it
        if not cached:
            text_out = _text_attention(q, k, v, segments, mask)
            if prefill:
                self._prefill[layer_cache] = (query[:, cache_write_slice].clone(), text_out)

        def own(image_out=None):  # the model's attention: the text's rows causal, the image's over every key
            if image_out is None:
                image_out = attention(image_q, k, v, mask=mask)
            return torch.cat([text_out, image_out], dim=2)

        out = self.session.attend(self.site, q, k, v, text=slice(0, n_text), image=slice(n_text, q.shape[2]),
                                  mask=mask, own=own)
        out = out[:, :, n_text:] if cached else torch.cat([text_out, out[:, :, n_text:]], dim=2)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _text_attention(q, k, v, segments, valid) -> torch.Tensor:
    """The text rows' attention as QwenImage21AttnProcessor computes it at the prefill: each segment over the keys
    before its end, causally over its own (text-to-image calls hold text segments only: condition images are refused
    before any step); `valid` (batch, 1, 1, keys) masks padding keys. q, k, v and the result (batch, heads, tokens,
    head_dim)."""
    outputs = []
    for start, end, _ in segments:
        n = end - start
        ones = torch.ones(n, start, dtype=torch.bool, device=q.device)
        mask = torch.cat([ones, torch.ones(n, n, dtype=torch.bool, device=q.device).tril()], dim=1)[None, None]
        if valid is not None:
            mask = mask & valid[..., :end]
        outputs.append(attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask=mask))
    return torch.cat(outputs, dim=2) if outputs else q[:, :, :0]


class QwenImage21Family(Family):
    """Qwen-Image 2.1: a joint site per block over the block-causal [text; image], text from Qwen3-VL after a system
    message, the text's keys and values cached after the first step."""

    name = "qwenimage21"
    denoiser_class = "QwenImage21Transformer2DModel"
    models = "Qwen-Image 2.1"
    known_processors = ("QwenImage21AttnProcessor",)

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per `transformer_blocks[i].attn`, text first."""
        n = len(transformer.transformer_blocks)
        return [AttentionSite(f"transformer_blocks.{i}.attn", self.name, "joint", i, n, "single", 1, True)
                for i in range(n)]

    def make_processor(self, site, session, original):
        """The processor reproducing QwenImage21AttnProcessor."""
        return QwenImage21Processor(site, session)

    def check_processor(self, site, processor) -> None:
        """Also: the flex-attention processor (one `flex_attention` call with a block mask) is refused, naming the
        default one, which computes the same attention per segment."""
        if type(processor).__name__ == "QwenImage21FlexAttnProcessor":
            raise UsageError(
                f"{site.name} uses QwenImage21FlexAttnProcessor (the block-causal prefill as one flex_attention call), "
                "which attnctl does not reproduce; set the default processor, which computes the same attention per "
                "segment: `pipe.transformer.set_attn_processor(QwenImage21AttnProcessor())` (from "
                "diffusers.models.transformers.transformer_qwenimage21), then call attnctl.apply")
        super().check_processor(site, processor)

    def text_segments(self, pipe):
        """The prompt's tokens inside the pipeline's text-to-image template after its system message, less the system
        message's tokens, which the pipeline drops; the rows are padded on the right."""
        tokenizer = _tokenizer(pipe)
        template = pipe.prompt_template_t2i
        if template.count("{}") != 1:
            raise UsageError("the pipeline's prompt_template_t2i does not hold the prompt's place \"{}\" once; leave "
                             "it as the pipeline sets it")
        return [TextSegment(tokenizer, 0, TEXT_LIMIT, template=template, drop=int(pipe._drop_idx),
                            padding_side="right")]

    def encoder_check(self, pipe, prompts):
        """(text encoder, check): the encoder's first call of each pipeline call must hold each prompt inside the
        template the words were placed for, padded on the left (the pipeline pads so; `chat_encoder_check`); another
        prompt or template is a UsageError before any step. None without a text encoder or processor."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "processor", None) is None:
            return None
        return chat_encoder_check(
            pipe, self.text_segments(pipe)[0], prompts, "Qwen-Image 2.1's text-to-image template", padded=False,
            tokenizer=pipe.processor, left=True, truncated=False,
            remedy="pass the same prompt to both, and leave the pipeline's sys_prompt and prompt_template_t2i as "
                   "they were when apply was entered (where the prompt is given as prompt_embeds with a negative "
                   "prompt of as many tokens, give negative_prompt_embeds too)")

    def lone_encoding_is_prompts(self, pipe, encoding, args, kwargs) -> bool:
        """QwenImage21Pipeline runs guidance without saying so (it has no `do_classifier_free_guidance`), and given
        prompt_embeds and a negative prompt it encodes the negative prompt alone. The lone encoding is the prompts'
        where the text the denoiser gets is as long, row for row (each row's tokens the mask keeps less the system
        message's, repeated per image), which a negative prompt of another length is not."""
        ids = argument(*encoding, "input_ids", 0)
        if ids is None or ids.dim() != 2:
            return True
        kept = argument(*encoding, "attention_mask", 1)
        counts = [int(c) - int(pipe._drop_idx) for c in
                  ([ids.shape[1]] * ids.shape[0] if kept is None else kept.sum(1).tolist())]
        text = argument(args, kwargs, "encoder_hidden_states", 1)
        mask = argument(args, kwargs, "encoder_hidden_states_mask", 5)
        lengths = [text.shape[1]] * text.shape[0] if mask is None else [int(n) for n in mask.sum(1).tolist()]
        if not counts or len(lengths) % len(counts):
            return False
        images = len(lengths) // len(counts)
        return lengths == [c for c in counts for _ in range(images)]

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """Each prompt row's text holds as many tokens as the prompt has in the template, less the system message's
        (embeddings of another prompt, or made another way, are refused)."""
        text = argument(args, kwargs, "encoder_hidden_states", 1)
        mask = argument(args, kwargs, "encoder_hidden_states_mask", 5)
        for row in range(step.cond_rows.start, step.cond_rows.stop):
            tokens = prompts[min(step.prompt_of_row(row - step.cond_rows.start), len(prompts) - 1)]
            length = text.shape[1] if mask is None else int(mask[row].sum())
            if length != tokens.token_count:
                raise UsageError(
                    f"the Qwen-Image 2.1 pipeline was given a text of {length} tokens where the prompt "
                    f"{tokens.prompt!r} in its template has {tokens.token_count}: prompt_embeds of another prompt or "
                    "made another way; make them with pipe.encode_prompt(prompt) or pass the prompt itself")

    def timestep(self, args, kwargs):
        """The `timestep` argument (the third) times 1000, back on the scheduler's scale."""
        return argument(args, kwargs, "timestep", 2) * 1000  # the pipeline passes t / 1000

    def size_step(self, pipe, denoiser):
        """32 (two tokens of 16 pixels: `size_multiple`): the pipeline floors the height and width to multiples of
        twice its VAE's 16, with a warning."""
        return 2 * self.size_multiple(pipe, denoiser), "the pipeline floors other sizes to multiples of two tokens"

    def token_grid(self, denoiser, args, kwargs):
        """The generated image's (rows, columns) of tokens: the last entry of `img_shapes`. A call with condition
        images (`image=`, whose tokens the pipeline puts inside the text) is a UsageError before it runs."""
        shapes = argument(args, kwargs, "img_shapes", 3)
        if len(shapes[0]) > 1:
            raise UsageError(
                f"QwenImage21Pipeline was called with {len(shapes[0]) - 1} condition image(s) (image=), whose tokens "
                "the pipeline places inside the text; attnctl supports Qwen-Image 2.1's text-to-image calls: call it "
                "without image=")
        frames, h, w = shapes[0][-1]
        return int(h), int(w)

    def text_len(self, args, kwargs):
        """The text tokens before the image: the length of `encoder_hidden_states` (text-to-image calls)."""
        return argument(args, kwargs, "encoder_hidden_states", 1).shape[1]

    def replay_arguments(self, named: dict) -> dict:
        """The pipeline's call without its KV cache: a forward attnctl runs itself computes the text for its own
        rows and prompt, and leaves the pipeline's cache (its rows, its prompt) as it was."""
        return {k: v for k, v in named.items() if k not in CACHE_ARGUMENTS}

    def latents_prediction(self, out: torch.Tensor, n_latents: int) -> torch.Tensor:
        """A forward without the KV cache predicts for the whole sequence: the latents' prediction is its end (the
        pipeline keeps the same part)."""
        return out[:, -n_latents:]


def _tokenizer(pipe):
    """The tokenizer inside the pipeline's Qwen3-VL processor; a UsageError without one."""
    processor = getattr(pipe, "processor", None)
    if processor is None:
        raise UsageError(f"{type(pipe).__name__} has no processor, whose tokenizer attnctl places the prompt's words "
                         "by; load the pipeline with its processor")
    return text_tokenizer(processor)


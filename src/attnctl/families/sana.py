"""Sana (SanaTransformer2DModel): a DiT whose blocks have linear self-attention (not a site) and a text
cross-attention (`attn2`, SanaAttnProcessor2_0) over Gemma-2 tokens with a padding mask, like PixArt's.

Its pipelines put a "complex human instruction" (a call argument with a long default) before the lowercased prompt,
tokenize the whole, and keep the start token and the last `max_sequence_length - 1` tokens: the instruction's last
token, then the prompt, padded on the right. Word positions are found that way, under the pipeline's default
instruction; the token ids the text encoder is given are checked (`encoder_check`), so a call with another
instruction, which moves every word, is refused instead of reading the wrong tokens."""

from __future__ import annotations

import inspect

from ..errors import UsageError
from ..tokens import TextSegment
from .base import argument
from .pixart import PixArtFamily

MAX_GEMMA_TOKENS = 8192  # Gemma 2's context; a call's max_sequence_length (300 by default) cuts the sequence


class SanaCrossProcessor:
    """Computes what diffusers' SanaAttnProcessor2_0 computes (q/k norms, as Sana 1.5 and Sprint have, act on all
    heads together, before the split), with the attention itself done by the session."""

    def __init__(self, site, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = self.session.attend(self.site, query, key, value, text=slice(0, key.shape[2]),
                                  image=slice(0, query.shape[2]), mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def default_instruction(pipe) -> str:
    """The instruction the pipeline puts before the prompt when called without `complex_human_instruction`."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    lines = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
    return "\n".join(lines) if lines else ""


def _contains(row: list[int], run: list[int]) -> bool:
    return any(row[i : i + len(run)] == run for i in range(len(row) - len(run) + 1))


class SanaFamily(PixArtFamily):
    name = "sana"
    denoiser_class = "SanaTransformer2DModel"
    known_processors = ("SanaAttnProcessor2_0",)

    def make_processor(self, site, session, original):
        return SanaCrossProcessor(site, session)

    def text_segments(self, pipe):
        instruction = default_instruction(pipe)
        # the pipeline counts the instruction's tokens with the start token and keeps its last one
        drop = max(0, len(pipe.tokenizer.encode(instruction)) - 2) if instruction else 0
        return [TextSegment(pipe.tokenizer, 0, MAX_GEMMA_TOKENS, template=instruction + "{}", drop=drop, drop_from=1,
                            lowercase=True, padding_side="right")]

    def encoder_check(self, pipe, prompts):
        """Refuses a prompt encoded after another instruction than the default: the first text-encoder call of a
        pipeline call encodes the prompts; a row that is not the default instruction and the prompt, yet holds the
        prompt's tokens, was given another instruction."""
        tokenizer, instruction = pipe.tokenizer, default_instruction(pipe)
        texts = [p.prompt.strip().lower() for p in prompts]
        wanted = [tokenizer(instruction + t)["input_ids"] for t in texts]
        # the prompt's own tokens but the first, which may merge with what precedes it (all of a one-token prompt)
        alone = [ids[1:] or ids for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)]

        def check(args, kwargs):
            for row, want, own in zip(argument(args, kwargs, "input_ids", 0).tolist(), wanted, alone):
                n = min(len(row), len(want))
                if row[:n] != want[:n] and _contains(row, own):
                    raise UsageError(
                        f"{type(pipe).__name__} was called with a complex_human_instruction other than its default, "
                        "which moves the prompt's tokens; attnctl finds words under the default instruction: call "
                        "the pipeline without complex_human_instruction")

        return pipe.text_encoder, check

"""Sana (SanaTransformer2DModel): a DiT whose blocks have linear self-attention (not a site) and a text
cross-attention (`attn2`, SanaAttnProcessor2_0) over Gemma-2 tokens with a padding mask, like PixArt's.

Its pipelines put a "complex human instruction" (a call argument with a long default) before the lowercased prompt,
tokenize the whole, and keep the start token and the last `max_sequence_length - 1` tokens: the instruction's last
token, then the prompt, padded on the right. Any instruction gives that layout but an empty one (None or []), which
keeps the start token and the prompt: every word one position earlier. Words are placed after an instruction; an
empty one is refused as the prompt is encoded (`encoder_check`), and embeddings made without one
(`pipe.encode_prompt`'s default) at the first denoiser call, from the number of tokens their mask keeps
(`check_text_layout`)."""

from __future__ import annotations

import inspect
import math

from ..errors import UsageError
from ..tokens import TextSegment
from .base import argument
from .pixart import PixArtFamily

MAX_GEMMA_TOKENS = 8192  # Gemma 2's context; a call's max_sequence_length (300 by default) cuts the sequence
EARLIER = ("puts every word of the prompt one token earlier than attnctl places it (after the instruction's last "
           "token, as with the pipeline's default)")


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


class SanaFamily(PixArtFamily):
    """Sana: PixArt's cross sites, over Gemma-2 tokens of the prompt placed after the pipeline's instruction."""

    name = "sana"
    denoiser_class = "SanaTransformer2DModel"
    models = "Sana"
    known_processors = ("SanaAttnProcessor2_0",)
    guidance_from_latents = False  # Sana's pipelines say whether they guide; Sprint, which does not, never does

    def make_processor(self, site, session, original):
        """The processor reproducing SanaAttnProcessor2_0."""
        return SanaCrossProcessor(site, session)

    def timestep_scale(self, pipe) -> float:
        """Sana Sprint's SCM scheduler counts TrigFlow angles, 0 to π/2, where the others count to 1000."""
        return 1000 / (math.pi / 2) if type(pipe.scheduler).__name__ == "SCMScheduler" else 1.0

    def text_segments(self, pipe):
        """Gemma tokens of the lowercased prompt after the pipeline's default instruction, of whose tokens only the
        start token and the last are kept; padded on the right."""
        instruction = default_instruction(pipe)
        # the pipeline counts the instruction's tokens with the start token and keeps its last one
        drop = max(0, len(pipe.tokenizer.encode(instruction)) - 2) if instruction else 0
        return [TextSegment(pipe.tokenizer, 0, MAX_GEMMA_TOKENS, template=instruction + "{}", drop=drop, drop_from=1,
                            lowercase=True, padding_side="right")]

    def encoder_check(self, pipe, prompts):
        """Refuses a prompt encoded without an instruction: the encoder is then given the start token and the
        prompt's own tokens."""
        if getattr(pipe, "text_encoder", None) is None or not default_instruction(pipe):
            return None  # prompt_embeds only (see check_text_layout), or a pipeline that has no instruction
        bare = [pipe.tokenizer(p.prompt.strip().lower())["input_ids"] for p in prompts]

        def check(args, kwargs):
            for row, alone in zip(argument(args, kwargs, "input_ids", 0).tolist(), bare):
                if len(alone) > 1 and row[: len(alone)] == alone[: len(row)]:  # the row may be cut
                    raise UsageError(
                        f"{type(pipe).__name__} was called with an empty complex_human_instruction (None or []), "
                        f"which {EARLIER}; call it with an instruction: its default, or your own")

        return pipe.text_encoder, check

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """The prompt rows' text mask keeps as many tokens as the prompt after an instruction has (read once per
        pipeline call)."""
        mask = argument(args, kwargs, "encoder_attention_mask", 4)
        if mask is None or mask.dim() != 2:
            return
        for row, count in enumerate(mask[step.cond_rows].sum(dim=1).tolist()):
            want = min(prompts[min(step.prompt_of_row(row), len(prompts) - 1)].token_count, mask.shape[1])
            if int(count) != want:
                raise UsageError(
                    f"the Sana pipeline was given a prompt text of {int(count)} tokens where the prompt after an "
                    f"instruction has {want}: prompt_embeds of another prompt, or made without an instruction "
                    f"(pipe.encode_prompt's default), which {EARLIER}; make them with one "
                    "(pipe.encode_prompt(prompt, complex_human_instruction=[...])) or pass the prompt itself")

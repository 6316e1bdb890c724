"""Sana (SanaTransformer2DModel): a DiT whose blocks have linear self-attention (not a site) and a text
cross-attention (`attn2`, SanaAttnProcessor2_0) over Gemma-2 tokens with a padding mask, like PixArt's.

Its pipelines put a "complex human instruction" (a call argument: a list of lines, with a long default) before the
lowercased prompt, tokenize the whole, `L` tokens padded on the right (L: the instruction's token count, start token
included, + max_sequence_length - 2), and keep the start token and the last `max_sequence_length - 1` tokens
(diffusers' `select_index`): the instruction's last token, then the prompt. An empty instruction (None or []) gives
`L` = max_sequence_length, all kept: the prompt right after the start token; one of empty text ([""]) keeps the start
token twice. Where the instruction's end and the prompt's start tokenize together (a space before a word can, in
Gemma's tokens), the instruction's last kept token is the prompt's first.

Words are placed after the pipeline's default instruction at `apply` (`text_segments`). Each pipeline call's
encoding is read (`encoder_check`): the instruction is the text the encoder's tokens hold before the prompt, checked
by tokenizing it with the prompt again, and the tokens dropped are counted from `L` and the text the denoiser's
first call is given; where that places some word elsewhere, the session lays the prompts out anew before any step.
A call through the session is laid out from its own `complex_human_instruction` before the controllers prepare it
(`call_text_segments`). Embeddings given without the encoder (`prompt_embeds`) are checked at the first denoiser call
from the number of tokens their mask keeps (`check_text_layout`)."""

from __future__ import annotations

import inspect
import math

from ..errors import UsageError
from ..tokens import TextSegment
from .base import argument
from .pixart import PixArtFamily

MAX_GEMMA_TOKENS = 8192  # Gemma 2's context; a call's max_sequence_length (300 by default) cuts the sequence
INSTRUCTION = "complex_human_instruction"
SHOWN = 60  # characters of the encoder's text a message quotes before the prompt


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


def joined(lines) -> str | None:
    """The text the pipeline puts before the prompt for `complex_human_instruction=lines`: its lines joined by
    newlines; None for none (a value that is not true: None, [])."""
    return "\n".join(lines) if lines else None


def default_instruction(pipe) -> str:
    """The instruction the pipeline puts before the prompt when called without `complex_human_instruction` ("" for
    none)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(INSTRUCTION)
    lines = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
    return joined(lines) or ""


def instruction_segment(tokenizer, instruction: str | None, drop: int) -> TextSegment:
    """The prompt's Gemma tokens after `instruction` (None: none), lowercased and stripped, padded on the right, of
    whose first tokens after the start token `drop` are not kept (-1: the start token is kept twice)."""
    if instruction is None:
        return TextSegment(tokenizer, 0, MAX_GEMMA_TOKENS, lowercase=True, padding_side="right")
    return TextSegment(tokenizer, 0, MAX_GEMMA_TOKENS, template=instruction + "{}", drop=drop, drop_from=1,
                       lowercase=True, padding_side="right")


def pipeline_drop(tokenizer, instruction: str | None) -> int:
    """The tokens the pipeline leaves out after the start token, for a call's `max_sequence_length` whatever it is:
    the instruction's token count (start token included) less 2; 0 without an instruction."""
    return 0 if instruction is None else len(tokenizer.encode(instruction)) - 2


def _instruction_in(pipe, ids: list[int], prompt: str, full: bool, placed: str) -> str:
    """The instruction text before `prompt` (the prompt as the pipeline encodes it, lowercased and stripped) in the
    text whose tokens are `ids` (start token first, padding left out); `full`: the text fills the encoder's input, so
    the prompt may have been cut, its beginning ending the text (`placed`, the instruction the prompts are laid out
    after now, is taken first where it fits). Checked by tokenizing the instruction and the prompt together again,
    which must give `ids` back; a UsageError otherwise."""
    tokenizer = pipe.tokenizer
    specials = set(getattr(tokenizer, "all_special_ids", []))
    lead = next((i for i, t in enumerate(ids) if t not in specials), len(ids))
    text = tokenizer.decode(ids[lead:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if text.endswith(prompt):
        instruction = text[: len(text) - len(prompt)]
    elif full and text.startswith(placed) and prompt.startswith(text[len(placed) :]):
        instruction = placed
    else:
        starts = [s for s in range(len(text)) if full and prompt.startswith(text[s:])]
        if not starts:
            raise UsageError(
                f"{type(pipe).__name__}'s text encoder was given a text ending in {text[-len(prompt) - SHOWN :]!r}, "
                f"which does not end with the prompt attnctl.apply was given, {prompt!r} (lowercased and stripped, as "
                "the pipeline does), whose words the methods act on; pass the same prompt to both (and "
                "clean_caption=False: attnctl does not reproduce the caption cleaning)")
        instruction = text[: starts[0]]  # the prompt's longest beginning the text ends with
    again = tokenizer(instruction + prompt, add_special_tokens=True)["input_ids"]
    if (again[: len(ids)] if full else again) != ids:
        raise UsageError(
            f"attnctl cannot tell where the words of {prompt!r} sit in the text {type(pipe).__name__}'s text encoder "
            f"was given: the instruction it reads there ({instruction[-SHOWN:]!r} at its end) and the prompt "
            f"tokenized together do not give the encoder's tokens back; call the pipeline with a "
            f"{INSTRUCTION} of plain text, or None")
    return instruction


class SanaFamily(PixArtFamily):
    """Sana: PixArt's cross sites, over Gemma-2 tokens of the prompt placed after the call's instruction."""

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
        """Gemma tokens of the lowercased prompt after the pipeline's default instruction (see `instruction_segment`):
        where `apply` places the words, before a call says its own."""
        instruction = default_instruction(pipe) or None
        return [instruction_segment(pipe.tokenizer, instruction, pipeline_drop(pipe.tokenizer, instruction))]

    def call_text_segments(self, pipe, args, kwargs):
        """The segments of a call whose prompt the pipeline encodes: after its `complex_human_instruction` (given or
        default); None for a call given `prompt_embeds` (checked at its first denoiser call) or arguments the
        pipeline does not take (it says what is wrong)."""
        signature = inspect.signature(type(pipe).__call__)
        if INSTRUCTION not in signature.parameters or getattr(pipe, "text_encoder", None) is None:
            return None
        try:
            given = signature.bind(pipe, *args, **kwargs).arguments
        except TypeError:
            return None
        if given.get("prompt_embeds") is not None:
            return None
        instruction = joined(given.get(INSTRUCTION, signature.parameters[INSTRUCTION].default))
        return [instruction_segment(pipe.tokenizer, instruction, pipeline_drop(pipe.tokenizer, instruction))]

    def encoder_check(self, pipe, prompts):
        """Reads the prompts' encoding: the instruction before each prompt (see `_instruction_in`; a UsageError where
        the text does not hold the prompt `apply` was given, or cannot be read back), and the text's length. The
        check answers with how to lay the prompts out given the denoiser's first call, whose text says how many
        tokens the pipeline kept (see the module's docstring)."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            return None  # prompt_embeds only (see check_text_layout)

        def check(args, kwargs):
            ids = argument(args, kwargs, "input_ids", 0)
            if ids is None or ids.dim() != 2:
                return None
            mask = argument(args, kwargs, "attention_mask", 1)
            rows = ids.tolist()
            kept = mask.sum(dim=1).tolist() if mask is not None and mask.shape == ids.shape else [len(r) for r in rows]
            placed = prompts[0].segments[0].template.partition("{}")[0]
            found = {_instruction_in(pipe, row[: int(n)], prompts[i % len(prompts)].prompt.strip().lower(),
                                     int(n) >= len(row), placed)
                     for i, (row, n) in enumerate(zip(rows, kept))}
            instruction, length = found.pop(), ids.shape[1]

            def place(denoiser_args, denoiser_kwargs):
                text = argument(denoiser_args, denoiser_kwargs, "encoder_hidden_states", 1)
                if text is None or found:  # rows of different instructions: not one pipeline's call
                    return None
                drop = length - text.shape[1]
                if drop < -1:
                    raise UsageError(
                        f"{type(pipe).__name__} gave its denoiser a text of {text.shape[1]} tokens from an encoding of "
                        f"{length}: attnctl knows Sana pipelines that keep the start token and the last "
                        "max_sequence_length - 1 tokens of it, and cannot place the words here")
                return [instruction_segment(pipe.tokenizer, instruction if instruction or drop else None, drop)]

            return place

        return pipe.text_encoder, check

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """The prompt rows' text mask keeps as many tokens as the prompt laid out after its instruction has (read once
        per pipeline call): what can be checked of `prompt_embeds`, made without the encoder."""
        mask = argument(args, kwargs, "encoder_attention_mask", 4)
        if mask is None or mask.dim() != 2:
            return
        placed = "after an instruction" if prompts[0].segments[0].template != "{}" else "without an instruction"
        for row, count in enumerate(mask[step.cond_rows].sum(dim=1).tolist()):
            want = min(prompts[min(step.prompt_of_row(row), len(prompts) - 1)].token_count, mask.shape[1])
            if int(count) != want:
                raise UsageError(
                    f"the Sana pipeline was given a prompt text of {int(count)} tokens where the prompt {placed} has "
                    f"{want}: prompt_embeds of another prompt, or made with another instruction than the call's "
                    "(pipe.encode_prompt's default is none, the pipeline's is its long instruction), whose tokens "
                    "attnctl cannot see; make them with the instruction the pipeline is called with "
                    f"(pipe.encode_prompt(prompt, {INSTRUCTION}=[...])), or pass the prompt itself")

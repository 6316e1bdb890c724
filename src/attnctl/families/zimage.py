"""Z-Image: ZImageTransformer2DModel, as ZImagePipeline calls it. A single-stream DiT; what departs from the others:

- the sequence: each image's latent tokens, padded to a multiple of 32 with a learned pad token, then its caption
  tokens, padded to a multiple of 32 with another: [image; image pads; text; text pads], per row, rows of different
  lengths padded at the end and masked (a key mask, (batch, 1, 1, keys)). The image pads and the text pads are not
  masked: they are keys and queries of the model's own, like FLUX.1 Kontext's context image. A site's image is the
  generated image's tokens, its text everything from the first caption token on (the caption's pads included, like
  T5's padding on FLUX.1): the joint kind, image first, with image→text and text→image where methods look for them.
  Only the main `layers` are sites: the refiner blocks before them attend within the image (`noise_refiner`) or the
  text (`context_refiner`) alone.
- the text: the prompt in Qwen3's chat template (thinking on, which adds nothing after the assistant's header),
  padded to `max_sequence_length` and truncated to it, of which the pipeline keeps only the tokens the mask keeps:
  no padding reaches the model, so a word's position is its templated position whatever the length. A prompt whose
  template does not fit is refused as it is encoded (`encoder_check`).
- RoPE: complex `freqs_cis` per token, three axes (the caption counts along the first, the image's rows and columns
  along the others), applied inside the processor as diffusers does.
- guidance: the batch is [prompt, negative], the prompt's rows first; `cfg_truncation` drops the negative rows
  from the steps past it (read from the step's time, as the pipeline decides it).
- latents: the denoiser takes a list of per-image (channels, 1, height, width) tensors; `latents` gives them
  stacked as the pipeline takes them, (batch, channels, height, width). The timestep is 1 - t/1000.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

from ..errors import UsageError
from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import Family, argument
from .flux2 import SENTINEL, chat_encoder_check, chat_template


def rotated(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """`x` (batch, tokens, heads, head_dim) rotated by the complex `freqs_cis` (batch, tokens, head_dim / 2), as
    diffusers' ZSingleStreamAttnProcessor rotates q and k."""
    with torch.amp.autocast("cuda", enabled=False):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class ZImageProcessor:
    """Computes what diffusers' ZSingleStreamAttnProcessor computes at a main layer, with the attention done by the
    session over [image; image pads; text; text pads]."""

    def __init__(self, site: AttentionSite, session):
        self.site, self.session = site, session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        projections = (attn.to_q, attn.to_k, attn.to_v)
        query, key, value = (p(hidden_states).unflatten(-1, (attn.heads, -1)) for p in projections)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotated(query, freqs_cis), rotated(key, freqs_cis)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        h, w = self.session.step.token_grid
        n_image = h * w
        text_start = n_image + (-n_image) % SEQ_MULTI_OF  # after the image's pads
        q, k, v = (t.transpose(1, 2) for t in (query, key.to(dtype), value))
        out = self.session.attend(self.site, q, k, v, text=slice(text_start, hidden_states.shape[1]),
                                  image=slice(0, n_image), mask=attention_mask)
        out = attn.to_out[0](out.transpose(1, 2).flatten(2, 3).to(dtype))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


class ZImageFamily(Family):
    """Z-Image: a joint site per main layer over [image; text] in one sequence, text from Qwen3's chat template."""

    name = "zimage"
    denoiser_class = "ZImageTransformer2DModel"
    models = "Z-Image"
    known_processors = ("ZSingleStreamAttnProcessor",)
    latents_name = "x"

    def discover(self, transformer) -> list[AttentionSite]:
        """One joint site per main layer (`layers.i.attention`), image first."""
        n = len(transformer.layers)
        return [AttentionSite(f"layers.{i}.attention", self.name, "joint", i, n, "single", 1, False)
                for i in range(n)]

    def make_processor(self, site, session, original):
        """The processor reproducing ZSingleStreamAttnProcessor."""
        return ZImageProcessor(site, session)

    def text_segments(self, pipe):
        """The prompt's tokens in Qwen3's chat template (as the pipeline renders it, thinking on), up to 512 (the
        pipeline's default max_sequence_length); no padding reaches the model."""
        template = chat_template(pipe.tokenizer, [{"role": "user", "content": SENTINEL}], add_generation_prompt=True,
                                 enable_thinking=True)
        return [TextSegment(pipe.tokenizer, 0, 512, template=template, padding_side="right")]

    def encoder_check(self, pipe, prompts):
        """The prompts' encoding, checked token for token against the template (see `chat_encoder_check`); None
        without a text encoder."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            return None
        return chat_encoder_check(pipe, self.text_segments(pipe)[0], prompts, "Z-Image's chat template", padded=False)

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """The prompt rows' captions hold as many tokens as the prompt in the template has (embeddings given as
        `prompt_embeds`, made another way or of another prompt, are refused)."""
        captions = argument(args, kwargs, "cap_feats", 2)
        for row in range(step.cond_rows.start, step.cond_rows.stop):
            tokens = prompts[min(step.prompt_of_row(row - step.cond_rows.start), len(prompts) - 1)]
            if len(captions[row]) != tokens.token_count:
                raise UsageError(
                    f"the Z-Image pipeline was given a caption of {len(captions[row])} tokens where the prompt "
                    f"{tokens.prompt!r} in the chat template has {tokens.token_count}: prompt_embeds of another prompt "
                    "or made another way; make them with pipe.encode_prompt(prompt) or pass the prompt itself")

    def timestep(self, args, kwargs):
        """The scheduler's timestep: the pipeline passes (1000 - t) / 1000."""
        return (1 - torch.as_tensor(argument(args, kwargs, "t", 1))) * 1000

    def batch_size(self, args, kwargs) -> int:
        """Rows in the call: the length of the latents' list."""
        return len(argument(args, kwargs, "x", 0))

    def latents(self, args, kwargs):
        """The latents as the pipeline takes them (`latents=`): the list's (channels, 1, height, width) tensors
        stacked to (batch, channels, height, width)."""
        x = argument(args, kwargs, "x", 0)
        return torch.stack([t.squeeze(1) for t in x]) if isinstance(x, (list, tuple)) else x

    def patch_size(self, denoiser) -> int:
        """2: the pipeline calls the denoiser with its default patch of 2x2 latent pixels."""
        return 2

    def token_grid(self, denoiser, args, kwargs):
        """(rows, columns) of image tokens, from the first latent's size and the call's patch size. The denoiser
        given anything but its list of per-image latents (the pipeline's own, by a method running the denoiser
        itself) is a UsageError: it cannot take them."""
        x = argument(args, kwargs, "x", 0)
        if not isinstance(x, (list, tuple)) or not x or not torch.is_tensor(x[0]) or x[0].dim() != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise UsageError(
                f"{type(denoiser).__name__} takes its latents as a list of per-image (channels, 1, height, width) "
                f"tensors and was called with {shape}, the pipeline's layout: a method that runs the denoiser itself "
                f"on the pipeline's latents cannot run on {self.models}; the methods that act on the attention of "
                "the pipeline's own denoiser calls can")
        p = kwargs.get("patch_size", 2)
        return x[0].shape[-2] // p, x[0].shape[-1] // p

    def text_len(self, args, kwargs):
        """The text part of the sequence: the longest caption, with its pads to a multiple of 32."""
        captions = argument(args, kwargs, "cap_feats", 2)
        longest = max(len(c) for c in captions)
        return longest + (-longest) % SEQ_MULTI_OF

    def conditional_rows(self, pipe, args, kwargs, context, call_of_step, n_prompts) -> slice:
        """The prompt's rows: the first half of the batch under classifier-free guidance ([prompt, negative]),
        all of it at steps `cfg_truncation` runs without the negative prompt."""
        batch = self.batch_size(args, kwargs)
        if context == "uncond":
            return slice(0, 0)
        if not getattr(pipe, "do_classifier_free_guidance", False) or batch % 2:
            return slice(0, batch)
        truncation = getattr(pipe, "_cfg_truncation", None)
        t = float(torch.as_tensor(argument(args, kwargs, "t", 1)).flatten()[0])
        if truncation is not None and float(truncation) <= 1 and t > float(truncation):
            return slice(0, batch)  # the pipeline drops the negative rows past the truncation
        return slice(0, batch // 2)

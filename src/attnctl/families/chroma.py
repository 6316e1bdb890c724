"""Chroma: ChromaTransformer2DModel, FLUX.1-schnell's blocks (diffusers' FluxAttnProcessor) with T5 text only and a
text padding mask. Two things differ from FLUX.1 for attnctl:
- the mask: the pipeline's per-token mask m (the prompt's tokens and the first padding token 1, the rest 0, then 1
  for every image token) reaches the attention as m_i · m_j for query i and key j. In diffusers it is a float
  tensor, so SDPA adds it to the logits (+1 on pairs of kept tokens) rather than masking; attnctl reproduces that
  exactly. Every image query sees the same keys, so the image rows' mask is the key mask methods and maps work with;
  padding text queries keep the model's own attention (`Session.attend`).
- classifier-free guidance runs the negative prompt as a second denoiser call per step, after the prompt's: that
  call is unconditional (not captured, not tuned)."""

from __future__ import annotations

from ..tokens import TextSegment
from .base import argument
from .flux import FluxFamily


class ChromaFamily(FluxFamily):
    """Chroma: FLUX's sites and processor with T5 text only, a text padding mask, and the negative prompt as a
    separate denoiser call."""

    name = "chroma"
    denoiser_class = "ChromaTransformer2DModel"
    models = "Chroma"
    known_processors = ("FluxAttnProcessor",)
    separate_guidance_calls = True

    def image_key_mask(self, mask, image: slice):
        """The image queries' row of Chroma's pairwise mask, (batch, 1 or heads, 1, keys); None for a mask that is
        already per key."""
        if mask.dim() == 4 and mask.shape[2] > 1:
            return mask[:, :, image.start:image.start + 1]
        return None

    def text_segments(self, pipe):
        """512 tokens of Chroma's one tokenizer (T5)."""
        return [TextSegment(pipe.tokenizer, 0, 512)]

    def timestep(self, args, kwargs):
        """The `timestep` argument (the third: Chroma has no pooled projections) times 1000."""
        return argument(args, kwargs, "timestep", 2) * 1000

    def token_grid(self, denoiser, args, kwargs):
        """The image token grid from `img_ids`, as FLUX's (one argument earlier)."""
        return self._grid(argument(args, kwargs, "img_ids", 3))

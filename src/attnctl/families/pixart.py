"""PixArt-α/Σ: PixArtTransformer2DModel, a DiT whose every block has a text cross-attention (`attn2`, diffusers'
AttnProcessor2_0) over T5 tokens with a padding mask. The sites are cross sites like a UNet's, all on the one token
grid; the mask reaches the controllers as `AttentionCall.key_bias`."""

from __future__ import annotations

from ..sites import AttentionSite
from ..tokens import TextSegment
from .base import LatentImageFamily, argument
from .unet import UNetCrossProcessor

MAX_T5_TOKENS = 512  # PixArt-Σ encodes up to 300 tokens by default; positions past the call's length are cut


class PixArtFamily(LatentImageFamily):
    """PixArt-α/Σ: a cross site per block's `attn2`, all on the full token grid; T5 text with a padding mask."""

    name = "pixart"
    denoiser_class = "PixArtTransformer2DModel"
    models = "PixArt-α/Σ"
    known_processors = ("AttnProcessor2_0",)
    guidance_from_latents = True

    def discover(self, transformer) -> list[AttentionSite]:
        """One cross site per transformer block that has an `attn2`, in block order, none downsampled."""
        names = [f"transformer_blocks.{i}.attn2" for i, block in enumerate(transformer.transformer_blocks)
                 if getattr(block, "attn2", None) is not None]
        return [AttentionSite(name, self.name, "cross", i, len(names), "transformer_blocks", 1, None)
                for i, name in enumerate(names)]

    def make_processor(self, site, session, original):
        """The UNet's cross processor, which computes what AttnProcessor2_0 does."""
        return UNetCrossProcessor(site, session)  # the same computation as AttnProcessor2_0 on any Attention

    def text_segments(self, pipe):
        """Up to `MAX_T5_TOKENS` T5 tokens of the prompt, lowercased and stripped as the pipeline does."""
        return [TextSegment(pipe.tokenizer, 0, MAX_T5_TOKENS, lowercase=True)]  # the pipeline lowercases the prompt

    def timestep(self, args, kwargs):
        """The `timestep` argument (the third)."""
        return argument(args, kwargs, "timestep", 2)


"""Family adapters: how to find the attention sites of a denoiser, compute q/k/v at them exactly as diffusers does,
and read the step inputs. Methods never import from here; they see `AttentionSite`s and tensors."""

from __future__ import annotations

from ..errors import UsageError
from .base import Family
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2 import Flux2Family
from .hidream import HiDreamFamily
from .lumina2 import Lumina2Family
from .pixart import PixArtFamily
from .qwenimage import QwenImageFamily
from .qwenimage21 import QwenImage21Family
from .sana import SanaFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .zimage import ZImageFamily

# every family attnctl knows, each declared once: a new family is its module plus one entry here
FAMILIES: list[Family] = [UNetFamily(), SD3Family(), FluxFamily(), ChromaFamily(), QwenImageFamily(), PixArtFamily(),
                           SanaFamily(), Flux2Family(), ZImageFamily(), Lumina2Family(), HiDreamFamily(),
                           QwenImage21Family()]
SUPPORTED = ("supported: " + ", ".join(f"{f.denoiser_class} ({f.models})" for f in FAMILIES)
             + "; to ask for another, open an issue naming the pipeline class")


def family_of(denoiser) -> Family:
    """The family in `FAMILIES` that reads `denoiser`; a UsageError listing the supported ones otherwise."""
    for family in FAMILIES:
        if family.matches(denoiser):
            return family
    raise UsageError(f"attnctl does not know the denoiser {type(denoiser).__name__}; {SUPPORTED}")


def refuse_without_sites(pipe, denoiser) -> None:
    """A denoiser of a known class whose attention is of another kind (Kandinsky 2.x: a UNet2DConditionModel whose
    attention takes image embeddings through added key/value projections, no prompt tokens) has no sites: refused
    before anything runs, naming what its attention is."""
    processors = sorted({type(p).__name__ for p in getattr(denoiser, "attn_processors", {}).values()})
    raise UsageError(
        f"{type(pipe).__name__}: its {type(denoiser).__name__} has no attention over prompt tokens that attnctl "
        f"knows (its attention processors: {', '.join(processors) or 'none'}; e.g. Kandinsky 2.x conditions on "
        f"image embeddings); {SUPPORTED}"
    )

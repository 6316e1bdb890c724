"""Family adapters: how to find the attention sites of a denoiser, compute q/k/v at them exactly as diffusers does,
and read the step inputs. Methods never import from here; they see `AttentionSite`s and tensors."""

from __future__ import annotations

from ..errors import UsageError
from .base import Family
from .flux import FluxFamily
from .sd3 import SD3Family
from .unet import UNetFamily

FAMILIES: list[Family] = [UNetFamily(), SD3Family(), FluxFamily()]


def family_of(denoiser) -> Family:
    for family in FAMILIES:
        if family.matches(denoiser):
            return family
    raise UsageError(
        f"attnctl does not know the denoiser {type(denoiser).__name__}; supported: UNet2DConditionModel "
        "(SD 1.x/2.x, SDXL), SD3Transformer2DModel (SD3/3.5), FluxTransformer2DModel (FLUX.1)"
    )

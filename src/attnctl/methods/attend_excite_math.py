"""The arithmetic of Attend-and-Excite (Chefer et al., SIGGRAPH 2023) as diffusers'
`StableDiffusionAttendAndExcitePipeline` computes it: from the cross-attention maps averaged over heads and the 16×16
sites, each target token's smoothed maximum, and the loss on the most neglected token. The controller that feeds
it and moves the latents is issue 15's next step.

Reproduced as the reference does it, quirks included:
- the maps lose the first and the *last* text position (not the end-of-text token), then are scaled by 100 and
  re-normalised with a softmax over the positions left;
- the 3×3 smoothing kernel with σ = 0.5 is exp(−((x − μ)/(2σ))²) per axis (not the usual 2σ²), normalised to sum
  to 1, applied after reflect padding by one pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothing_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The reference's 2-D smoothing kernel, (1, 1, size, size) float32."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    axis = torch.exp(-((x / (2 * sigma)) ** 2))
    kernel = axis[:, None] * axis[None, :]
    return (kernel / kernel.sum())[None, None]


def max_attention_per_token(maps: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """maps: (H, W, L) attention of each pixel on the L text positions; indices: target positions (1 .. L−2).
    Returns the smoothed maximum of each target's re-normalised map, (len(indices),)."""
    inner = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)
    kernel = smoothing_kernel().to(maps.device, maps.dtype)
    values = []
    for i in indices:
        image = F.pad(inner[:, :, i - 1][None, None], (1, 1, 1, 1), mode="reflect")
        values.append(F.conv2d(image, kernel).max())
    return torch.stack(values)


def neglect_loss(max_values: torch.Tensor) -> torch.Tensor:
    """The loss on the most neglected target: max over targets of max(0, 1 − its smoothed maximum)."""
    return (1 - max_values).clamp(min=0).max()

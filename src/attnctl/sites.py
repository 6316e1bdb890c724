"""Attention sites: the attention calls of a denoiser that a controller can see and change.

A site is described without reference to the model's classes, so methods stay family-agnostic. The per-family
discovery and processors live in `attnctl.families`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionSite:
    """One attention call of a denoiser, described without its model classes (`attnctl sites` lists them).

        site.name, site.kind, site.grid((64, 64))   # "down_blocks.2.attentions.0...attn2", "cross", (16, 16)
    """

    name: str  # module path in the denoiser, e.g. "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    family: str  # "unet" | "sd3" | "flux"
    kind: str  # "cross": image queries, text keys | "joint": one attention over [text; image] or [image; text]
    block: int  # position in forward order among the denoiser's sites
    num_sites: int
    stage: str  # coarse part of the network: "down_blocks.2", "mid_block", "joint", "double", "single"
    downsample: int  # image token grid = the denoiser's token grid // downsample
    text_first: bool | None  # joint sites: text tokens come before the image tokens (FLUX) or after (SD3)

    @property
    def depth(self) -> float:
        """Relative depth, block / number of sites, in [0, 1)."""
        return self.block / self.num_sites

    def grid(self, token_grid: tuple[int, int]) -> tuple[int, int]:
        """Image token grid of this site when the denoiser's own token grid is `token_grid`."""
        return downsampled(token_grid, self.downsample)


def downsampled(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """`grid` after log2(factor) stride-2 downsamplings (each rounds up, as the UNet's convolutions do)."""
    h, w = grid
    for _ in range(factor.bit_length() - 1):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def site_table(sites: list[AttentionSite], token_grid: tuple[int, int] | None = None) -> str:
    """The sites as a fixed-width text table (what `attnctl sites` prints)."""
    header = ("#", "name", "kind", "stage", "depth", "grid" if token_grid else "downsample", "text")
    rows = [header]
    for s in sites:
        where = "keys" if s.kind == "cross" else ("before image" if s.text_first else "after image")
        size = "x".join(map(str, s.grid(token_grid))) if token_grid else str(s.downsample)
        rows.append((str(s.block), s.name, s.kind, s.stage, f"{s.depth:.3f}", size, where))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

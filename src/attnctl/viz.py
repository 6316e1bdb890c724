"""Pictures people look at: token maps over the image."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def upsample(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def maps_figure(rows: dict[str, tuple], words: list[str], path: str | Path, title: str = "") -> None:
    """A grid: one row per label of `rows` ((image, (words, h, w) maps)), one column per word, each map over its
    image.

    Colours span each cell's own range (its maximum probability is printed), so weak and strong maps can both be
    read; the safetensors file keeps the raw probabilities.
    """
    n_rows, n_cols = len(rows), len(words) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows + (0.4 if title else 0)),
                             squeeze=False)
    for i, (label, (image, maps)) in enumerate(rows.items()):
        img = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        size = img.shape
        axes[i, 0].imshow(image)
        axes[i, 0].set_ylabel(label, fontsize=9)
        for j, word in enumerate(words):
            m = upsample(maps[j], size)
            ax = axes[i, j + 1]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.imshow(m, cmap="jet", alpha=0.55, vmin=float(m.min()), vmax=max(float(m.max()), float(m.min()) + 1e-8))
            if i == 0:
                ax.set_title(word, fontsize=10)
            ax.text(2, size[0] - 4, f"max {float(maps[j].max()):.3f}", color="white", fontsize=7,
                    bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

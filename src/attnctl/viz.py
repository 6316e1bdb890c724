"""Pictures people look at: token maps over the image, layouts over the image, the hierarchy curves, the
evaluation chart. Everything the package draws is drawn here."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .layout import Layout, load_layout  # noqa: E402
from .roles import ATTRIBUTE, BACKGROUND, INSTANCE, ROLES  # noqa: E402

OVERLAY_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                  (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def upsample(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map at `size`, each token a block (no smoothing: the token grid stays visible)."""
    return F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].numpy()


def maps_figure(rows: dict[str, tuple], words: list[str], path: str | Path, title: str = ""):
    """A grid: one row per label of `rows` ((image, (words, h, w) maps)), one column per word, each map over its
    image; returns the (closed) figure.

    Every map of the figure shares one colour scale, from 0 to the largest probability in the figure, shown by the
    colour bar on the right, so maps can be compared across words and rows; each map's own maximum is printed below
    it, and the safetensors file keeps the raw probabilities. Pictures and maps are drawn without smoothing.
    """
    n_rows, n_cols = len(rows), len(words) + 1
    top = max((float(maps[j].max()) for _, maps in rows.values() for j in range(len(words))), default=0.0)
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=max(top, 1e-8))
    fig, axes = plt.subplots(n_rows, n_cols + 1, figsize=(2.2 * n_cols + 0.9, 2.2 * n_rows + (0.4 if title else 0)),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * n_cols + [0.08]})
    for ax in axes[:, -1]:  # the last column is one axes for the colour bar, as tall as the grid
        ax.remove()
    bar = fig.add_subplot(axes[0, 0].get_gridspec()[:, -1])
    axes = axes[:, :-1]
    for i, (label, (image, maps)) in enumerate(rows.items()):
        img = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        size = img.shape
        axes[i, 0].imshow(image, interpolation="nearest")
        axes[i, 0].set_ylabel(label, fontsize=9)
        for j, word in enumerate(words):
            ax = axes[i, j + 1]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(upsample(maps[j], size), cmap="jet", alpha=0.55, norm=norm, interpolation="nearest")
            if i == 0:
                ax.set_title(word, fontsize=10)
            ax.set_xlabel(f"max {float(maps[j].max()):.3f}", fontsize=7)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="jet"), cax=bar, label="attention probability")
    _bare(axes.flat)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return fig


MIN_PICTURE_SIDE = 256  # small images (the shapes world's 64x64) are enlarged to at least this, without smoothing
LINE_HEIGHT = 14


def enlarged(image, min_side: int = MIN_PICTURE_SIDE):
    """`image` (PIL) scaled by a whole factor to at least `min_side` pixels, each pixel a block (no smoothing)."""
    from PIL import Image

    factor = max(1, -(-min_side // min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def overlay(image, layout: Layout, alpha: float = 0.35):
    """`image` (PIL) enlarged without smoothing to a readable size, each region tinted in its own colour (its sketch
    colour, if any) and outlined; the phrases are listed in their colours in a strip below the picture, never over
    it.

        overlay(image, Layout.load("examples/two_animals.json")).save("image_layout.png")
    """
    from PIL import Image, ImageDraw

    layout = load_layout(layout)
    base = enlarged(image.convert("RGB"))
    width, height = base.size
    lab = layout.labels((height, width)).numpy()
    arr = np.asarray(base).astype(np.float32)
    tint = arr.copy()
    colors = [r.color or OVERLAY_COLORS[i % len(OVERLAY_COLORS)] for i, r in enumerate(layout.regions)]
    for i in range(1, len(layout.regions) + 1):
        tint[lab == i] = colors[i - 1]
    picture = Image.fromarray(np.clip(arr * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i in range(1, len(layout.regions) + 1):
        ey, ex = np.nonzero((lab == i) & ~_eroded(lab == i))
        draw.point(list(zip(ex.tolist(), ey.tolist())), fill=colors[i - 1])
    legend = [(f"■ {region.phrase}", colors[i]) for i, region in enumerate(layout.regions)]
    if layout.background.strip():
        legend.append((f"□ background: {layout.background}", (0, 0, 0)))
    out = Image.new("RGB", (width, height + LINE_HEIGHT * len(legend) + 4), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, (text, color) in enumerate(legend):
        draw.text((4, height + 2 + LINE_HEIGHT * k), text, fill=tuple(int(c * 0.8) for c in color))
    return out


def _eroded(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def hierarchy_figure(curves: dict, path, title: str) -> None:
    """`curves`: per role, (depth, share, area, mass) per site (`Hierarchy.by_depth()`)."""
    colors = {INSTANCE: "tab:blue", ATTRIBUTE: "tab:red", BACKGROUND: "tab:green"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for role in ROLES:
        if role not in curves:
            continue
        depth, share, area, mass = zip(*curves[role])
        top.plot(depth, share, "o-", ms=3, color=colors[role], label=f"{role} words")
        top.plot(depth, area, ":", color=colors[role], alpha=0.7)
        bottom.plot(depth, mass, "o-", ms=3, color=colors[role], label=f"{role} words")
    top.set_ylabel("share of the role's attention\ninside its region")
    top.set_ylim(0, 1)
    top.set_title(title, fontsize=9)
    top.legend(fontsize=8, loc="best")
    top.text(0.99, 0.02, "dotted: uniform attention (region area)", transform=top.transAxes, ha="right",
             fontsize=7, color="grey")
    bottom.set_ylabel("mean attention per pixel\nto the role's words")
    bottom.set_xlabel("relative depth (block / number of blocks), mean over the recorded steps")
    _save(fig, path, dpi=120)


def eval_figure(summary: dict, categories, path, title: str = "") -> None:
    """Success rate per category with 95% intervals, one bar per method (`attnctl.eval.summarize`)."""
    labels = list(summary)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(2.2 * len(categories) + 1, 3.6))
    for k, label in enumerate(labels):
        xs, rates, errs = [], [], [[], []]
        for j, c in enumerate(categories):
            r = summary[label].get(c)
            if r is None:
                continue
            xs.append(j + (k - (len(labels) - 1) / 2) * width)
            rates.append(r["rate"])
            errs[0].append(r["rate"] - r["ci95"][0])
            errs[1].append(r["ci95"][1] - r["rate"])
        ax.bar(xs, rates, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(categories)), [c.replace("_", " ") for c in categories])
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate (95% CI)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)


def dose_figure(summary: dict, strengths, categories, title: str, path) -> None:
    """Success rate per category against the method's strength, with 95% intervals (`eval.write_dose`)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    labels = list(summary)
    for c in categories:
        rates = [summary[label][c]["rate"] for label in labels]
        lo = [r - summary[label][c]["ci95"][0] for r, label in zip(rates, labels)]
        hi = [summary[label][c]["ci95"][1] - r for r, label in zip(rates, labels)]
        ax.errorbar(list(strengths), rates, yerr=[lo, hi], marker="o", capsize=3, label=c.replace("_", " "))
    ax.set_xlabel("strength (1 = the published method)")
    ax.set_ylabel("success rate (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def comparison_figure(images: dict, path, title: str = "") -> None:
    """Images side by side (label -> PIL image, e.g. plain and regulated with the same seed), each enlarged without
    smoothing, its label above it."""
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.4 + (0.3 if title else 0)), squeeze=False)
    for ax, (label, image) in zip(axes[0], images.items()):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=10)
    _bare(axes[0])
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def seed_grid_figure(rows: dict[str, list], captions: dict[str, list[str]], seeds: list[int], path,
                     title: str = "") -> None:
    """One row of images per label (plain, the method), one column per seed, each image's caption (its judged
    outcome) under it."""
    fig, axes = plt.subplots(len(rows), len(seeds), figsize=(1.9 * len(seeds), 2.3 * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_title(f"seed {seeds[c]}" if r == 0 else "", fontsize=8)
            caption = captions.get(label, [""] * len(images))[c]
            ax.set_xlabel(caption.replace(": ", ":\n", 1), fontsize=7,
                          color="darkgreen" if caption in ("all bound", "all placed") else "darkred")
        axes[r][0].set_ylabel(label, fontsize=9)
        _bare(axes[r])
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _bare(axes) -> None:
    """No ticks: the axes show pictures, not coordinates."""
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def _save(fig, path, dpi: int = 100) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

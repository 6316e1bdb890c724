"""Writing what `run.generate` made: images, the plain image beside the method's, token maps (data and figures),
layout overlays and the seed grid, as PNGs with the data files beside them."""

from __future__ import annotations

import json
from pathlib import Path


def write(output, out: Path) -> list[Path]:
    """Every file of `output` (a `run.Output`) in `out`; returns their paths in the order written: image(s),
    plain image(s) and compare.png, maps.safetensors and maps.png, layout overlays, seeds.png and seeds.csv."""
    request = output.request
    written = save_images(output.images, out)
    if output.plain is not None:
        from .viz import comparison_figure

        written += save_images(output.plain, out, "plain")
        written.append(out / "compare.png")
        comparison_figure({"plain (same seed)": output.plain[0], request.method: output.images[0]}, written[-1],
                          request.prompt)
    if output.captures:
        written += write_maps(output.captures, output.words, out, "maps", request.prompt)
    if request.layout is not None:
        written += write_overlays(output.images, request.layout, out, "image")
        if output.plain is not None:
            written += write_overlays(output.plain, request.layout, out, "plain")
    if output.grid:
        written += write_seed_grid(output, out)
    return written


def save_images(images, out: Path, stem: str = "image") -> list[Path]:
    """STEM.png, or STEM_I.png for several images."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / (f"{stem}.png" if len(images) == 1 else f"{stem}_{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def write_maps(captures: dict[str, tuple], words, out: Path, stem: str, title: str) -> list[Path]:
    """`captures`: label -> (Capture, images). Writes STEM.safetensors (raw maps of every label) and STEM.png (one
    figure per image, the labels' rows side by side per resolution or depth group); returns the paths written."""
    from safetensors.torch import save

    from .viz import maps_figure

    tensors = {}
    for label, (capture, _) in captures.items():
        prefix = f"{label}/" if len(captures) > 1 else ""
        tensors.update({f"{prefix}site/{name}": m.contiguous() for name, m in capture.maps().items()})
        tensors.update({f"{prefix}group/{g}": m.contiguous() for g, m in capture.grouped().items()})
    # written as bytes, so the file gets the usual permissions (save_file makes it owner-only)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.safetensors"]
    paths[0].write_bytes(save(tensors, metadata={"words": json.dumps(words)}))
    grouped = {label: capture.grouped() for label, (capture, _) in captures.items()}
    n_images = len(next(iter(captures.values()))[1])
    for i in range(n_images):
        rows = {}
        for group in next(iter(grouped.values())):
            for label, (_, images) in captures.items():
                rows[f"{label} · {group}" if len(captures) > 1 else group] = (images[i], grouped[label][group][i])
        paths.append(out / (f"{stem}.png" if i == 0 else f"{stem}_{i}.png"))
        maps_figure(rows, words, paths[-1], title=title)
    return paths


def write_overlays(images, layout, out: Path, stem: str) -> list[Path]:
    """Each image with the layout's regions drawn over it (STEM_layout.png, or STEM_I_layout.png)."""
    from .viz import overlay

    paths = [out / (f"{stem}_layout.png" if len(images) == 1 else f"{stem}_{i}_layout.png")
             for i in range(len(images))]
    for image, path in zip(images, paths):
        overlay(image, layout).save(path)
    return paths


def write_seed_grid(output, out: Path) -> list[Path]:
    """seeds.png (the plain pipeline and the method side by side per seed, with the scorer's verdicts) and
    seeds.csv (the verdicts)."""
    from .eval import write_rows
    from .viz import seed_grid_figure

    paths = [out / "seeds.png", out / "seeds.csv"]
    seed_grid_figure(output.grid, output.captions, output.grid_seeds, paths[0], output.request.prompt)
    write_rows([{"seed": seed, **{label: output.captions[label][k] for label in output.grid}}
                for k, seed in enumerate(output.grid_seeds)], paths[1])
    return paths

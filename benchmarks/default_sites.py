"""Which attention sites each method reads or edits by default, per family of the README's support matrix (the tiny
random pipelines of tests/test_family_support.py): each method is attached with `attnctl.apply` and asked which sites
it wants (the latent-moving methods: at which of those it reads maps, `_choose_sites` at the token grid below). No
denoising step runs. Then AST's default bands at the full depth of each joint family, from the same `AST.band`.
`python benchmarks/default_sites.py` (the tables of docs/methods.md §9)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import attnctl  # noqa: E402
from attnctl import AST, Capture  # noqa: E402
from attnctl.control import sites_of  # noqa: E402
from attnctl.methods.latent_guidance import LatentGuidance  # noqa: E402
from attnctl.methods.registry import METHODS  # noqa: E402
from attnctl.sites import AttentionSite  # noqa: E402
from test_family_support import LAYOUT, NO, PROMPT, SUPPORT, cell, pipe_of  # noqa: E402

COLUMNS = ("capture", *METHODS)
# the denoiser's token grid at which the latent-moving methods choose the UNet maps they read: SD 1.x at 512², SDXL
# at 1024² (latent grids); the other families' choice does not depend on it
TOKEN_GRID = {"SDXL": (128, 128)}
DEFAULT_GRID = (64, 64)
# full depth of the joint families (double-stream, single-stream blocks), for AST's bands
FULL_DEPTH = {"FLUX.1, Chroma": (19, 38), "SD3 medium": (24, 0), "SD3.5 large": (38, 0), "FLUX.2 [dev]": (8, 48),
              "FLUX.2 [klein] 4B": (5, 20), "HiDream-I1": (16, 32), "Qwen-Image": (60, 0), "Z-Image": (0, 30),
              "Lumina-Image 2.0": (0, 26)}


def controller(column):
    """The method with its default options (targets for the target methods, the test layout for the others)."""
    if column == "capture":
        return Capture(["dog"])
    m = METHODS[column]
    return m.build(m.config(), targets=["dog", "cat"], layout=LAYOUT)


def default_sites(pipe, column, token_grid=DEFAULT_GRID) -> list[AttentionSite]:
    """The sites `column`'s method acts at by default on `pipe`: those it wants, or for a method that moves the
    latents the ones it reads maps at (it wants every site of the kinds it reads)."""
    method = controller(column)
    with attnctl.apply(pipe, method, prompt=PROMPT) as session:
        if isinstance(method, LatentGuidance):
            method._choose_sites(token_grid)
            return [s for s in session.sites if s.name in method._sites]
        return [s for s in session.sites if method.wants(s)]


def spans(blocks, prefix="") -> str:
    """[0, 1, 2, 5] -> "0–2, 5" (with prefix "d": "d0–d2, d5")."""
    out, run = [], []
    for b in blocks:
        if run and b != run[-1] + 1:
            out.append(run)
            run = []
        run.append(b)
    out += [run] if run else []
    return ", ".join(f"{prefix}{r[0]}–{prefix}{r[-1]}" if len(r) > 1 else f"{prefix}{r[0]}" for r in out)


def describe(chosen, sites) -> str:
    """"3/10: down_blocks.2, up_blocks.1" (stages of cross sites), "3/4: 1–3" (joint site indices), "all 4"."""
    if len(chosen) == len(sites):
        return f"all {len(sites)}"
    if chosen and all(s.kind == "cross" for s in chosen):
        where = ", ".join(dict.fromkeys(s.stage for s in chosen))
    else:
        where = spans([s.block for s in chosen]) or "none"
    return f"{len(chosen)}/{len(sites)}: {where}"


def family_table() -> str:
    rows = ["| family (tiny) | sites | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 2) + "|"]
    for family, _, _ in SUPPORT:
        if all(cell(family, c) == NO for c in COLUMNS):
            continue  # no site to choose from (Kandinsky 2.2)
        pipe = pipe_of(family)
        sites = sites_of(pipe)
        kinds = ", ".join(f"{sum(s.kind == k for s in sites)} {k}" for k in dict.fromkeys(s.kind for s in sites))
        grid = TOKEN_GRID.get(family, DEFAULT_GRID)
        cells = [describe(default_sites(pipe, c, grid), sites) if cell(family, c) != NO else "–" for c in COLUMNS]
        rows.append(f"| {family} | {kinds} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def joint_sites(double: int, single: int) -> list[AttentionSite]:
    """A joint family's sites in forward order, named d0.. (double-stream) and s0.. (single-stream or only stream)."""
    names = [(f"d{i}", "double") for i in range(double)] + [(f"s{i}", "single") for i in range(single)]
    return [AttentionSite(n, "joint", "joint", i, len(names), stage, 1, True) for i, (n, stage) in enumerate(names)]


def ast_depth_table() -> str:
    ast = AST(LAYOUT)
    rows = ["| AST band | " + " | ".join(f"{name} ({d}+{s})" if d and s else f"{name} ({d + s})"
                                         for name, (d, s) in FULL_DEPTH.items()) + " |",
            "|---" * (len(FULL_DEPTH) + 1) + "|"]
    for band in ast.schedule:
        cells = []
        for double, single in FULL_DEPTH.values():
            inside = [s for s in joint_sites(double, single) if ast.band(s) == band]
            if double and single:
                cells.append(", ".join(spans([int(s.name[1:]) for s in inside if s.name[0] == p], p) for p in "ds"
                                       if any(s.name[0] == p for s in inside)) or "–")
            else:
                cells.append(spans([s.block for s in inside]) or "–")
        rows.append(f"| {band.describe()} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(family_table())
    print()
    print(ast_depth_table())

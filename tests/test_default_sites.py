"""The sites each method acts at by default follow from the family's structure (docs/methods.md §9): on the tiny random
pipelines, what each method asks for once attached equals a rule computed from the site list (kind, stage,
downsampling, relative depth), never from layer names; and §9's tables are what benchmarks/default_sites.py prints.
No denoising step runs."""

import importlib.util
import math
import warnings
from fractions import Fraction
from pathlib import Path

import pytest

import attnctl
from attnctl.control import sites_of
from test_family_support import pipe_of

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("default_sites", ROOT / "benchmarks" / "default_sites.py")
default_sites_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default_sites_script)
default_sites = default_sites_script.default_sites

UNETS = ("SD 1.x / 2.x", "SDXL")
JOINT = ("SD3 / SD3.5", "FLUX.1 dev / schnell", "Chroma", "Qwen-Image", "Z-Image", "HiDream-I1")


def names(sites):
    return {s.name for s in sites}


def flux_at_full_depth():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnctl.load_pipeline("random:flux-tiny?double=19&single=38")  # FLUX.1's 19 + 38 blocks, tiny layers


@pytest.mark.parametrize("family", [*UNETS, "PixArt-Σ", "Sana"])
def test_regulation_edits_the_coarsest_cross_stages_outside_the_mid_block(family):
    sites = sites_of(pipe_of(family))
    outer = [s for s in sites if s.kind == "cross" and s.stage != "mid_block"]
    coarsest = max(s.downsample for s in outer)
    chosen = default_sites(pipe_of(family), "regulation")
    assert names(chosen) == {s.name for s in outer if s.downsample == coarsest}
    if family in UNETS:  # a down stage and its mirror on the way up, whole stages, no mid block
        mid = min(s.block for s in sites if s.stage == "mid_block")
        assert min(s.block for s in chosen) < mid < max(s.block for s in chosen)
        assert names(chosen) == {s.name for s in sites if s.stage in {c.stage for c in chosen}}
    if family == "SD 1.x / 2.x":  # at 512² (a 64x64 latent grid) these are the paper's 16x16 layers, less the mid's
        assert names(chosen) == {s.name for s in outer if s.grid((64, 64)) == (16, 16)}


@pytest.mark.parametrize("family", [*JOINT, "FLUX.1 at full depth"])
def test_ast_tunes_by_relative_depth(family):
    pipe = flux_at_full_depth() if family == "FLUX.1 at full depth" else pipe_of(family)
    sites = sites_of(pipe)
    chosen = names(default_sites(pipe, "ast"))
    # every band from relative depth 5/57 on tunes something (the reference's first five of FLUX.1's 57 blocks: none)
    assert chosen == {s.name for s in sites if Fraction(s.block, s.num_sites) >= Fraction(5, 57)}
    ast = default_sites_script.controller("ast")
    for s in sites:
        band = ast.band(s)
        assert band.start <= Fraction(s.block, len(sites)) < band.stop
    if family == "FLUX.1 at full depth":  # exactly the reference's blocks: d5–d18 instance, then the single blocks
        double = [s for s in sites if s.stage == "double"]
        single = [s for s in sites if s.stage == "single"]
        assert len(double) == 19 and len(single) == 38
        roles = [ast.band(s).roles for s in double[5:]]
        assert set(roles) == {("instance",)}
        assert {ast.band(s).roles for s in single[:5]} == {("instance", "background")}
        assert {ast.band(s).roles for s in single[5:15]} == {("instance", "attribute")}
        assert {ast.band(s).roles for s in single[15:31]} == {("attribute",)}
        assert {(b.i2i, b.t2t) for b in map(ast.band, single[31:])} == {(False, False)}


@pytest.mark.parametrize("family, grid", [("SD 1.x / 2.x", (64, 64)), ("SD 1.x / 2.x", (32, 32)), ("SDXL", (128, 128)),
                                          ("Sana", (32, 32))])
@pytest.mark.parametrize("method", ["attend-excite", "binding"])
def test_the_gradient_methods_read_the_cross_sites_whose_side_is_nearest_16(family, grid, method):
    cross = [s for s in sites_of(pipe_of(family)) if s.kind == "cross"]
    sides = {max(s.grid(grid)) for s in cross}
    nearest = min(sides, key=lambda side: (abs(math.log2(side / 16)), -side))  # the larger one on a tie
    chosen = default_sites(pipe_of(family), method, grid)
    assert names(chosen) == {s.name for s in cross if max(s.grid(grid)) == nearest}


@pytest.mark.parametrize("family, method", [
    *[(f, m) for f in ("SD 1.x / 2.x", "FLUX.1 dev / schnell", "Lumina-Image 2.0")
      for m in ("capture", "layout-modulation", "relocation")],
    ("FLUX.1 dev / schnell", "binding"), ("Lumina-Image 2.0", "binding")])  # binding on a UNet: the test above
def test_the_other_methods_act_at_every_site_of_the_kinds_they_read(family, method):
    sites = sites_of(pipe_of(family))  # every site here is cross or joint
    assert names(default_sites(pipe_of(family), method)) == names(sites)


def test_the_docs_tables_are_what_the_script_prints():
    text = (ROOT / "docs" / "methods.md").read_text()
    assert default_sites_script.family_table() in text, "paste `python benchmarks/default_sites.py` into §9"
    assert default_sites_script.ast_depth_table() in text, "paste `python benchmarks/default_sites.py` into §9"

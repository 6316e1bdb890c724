"""The hierarchy analysis: its share is the in-region fraction of each role's attention (checked against a direct
computation), it sees AST's tuned maps, and `attnctl analyze` writes hierarchy.csv and hierarchy.png."""

import csv
from pathlib import Path

import torch

import attnctl
from attnctl.analysis import COLUMNS, Hierarchy
from attnctl.control import AttentionCall, Session, StepState
from attnctl.methods.ast import AST
from attnctl.tokens import PromptTokens

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red dog and a grey cat on the grass"
LAYOUT = {"prompt": PROMPT, "background": "the grass",
          "regions": [{"phrase": "a red dog", "box": [0.0, 0.25, 0.5, 1.0]},
                      {"phrase": "a grey cat", "box": [0.5, 0.25, 1.0, 1.0]}]}
ROOT = Path(__file__).resolve().parent.parent


def test_share_is_the_in_region_fraction_of_each_roles_attention():
    pipe = tiny_pipe("flux")
    h = Hierarchy(LAYOUT, role_parser="rules")
    session = Session(pipe, [h])
    tokens = PromptTokens(PROMPT, session.family.text_segments(pipe))
    session.prompts = [tokens]
    h.attach(session)
    n_txt, grid, heads = 32, (4, 4), 2
    step = StepState(index=0, num_steps=1, timestep=1000.0, batch_size=1, cond_rows=slice(0, 1), token_grid=grid,
                     text_len=n_txt)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n_txt + 16, 16, generator=g) for _ in range(3))
    h(AttentionCall(session.sites[1], step, q, k, v, text=slice(0, n_txt), image=slice(n_txt, n_txt + 16), grid=grid))
    P = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, -1)[0, :, n_txt:, :n_txt].mean(0)  # (16, 32)
    labels = h.layout.labels(grid).flatten()
    words = {"instance": [("a red dog", ["a", "dog"], 1), ("a grey cat", ["a", "cat"], 2)],
             "attribute": [("a red dog", ["red"], 1), ("a grey cat", ["grey"], 2)],
             "background": [("the grass", ["the", "grass"], 0)]}
    rows = {r["role"]: r for r in h.rows}
    assert set(rows) == set(words)
    for role, groups in words.items():
        inside = total = 0.0
        for phrase, keep, region in groups:
            cols = [p for p in tokens.phrase_positions(phrase) if tokens.token_strings[p] in keep]
            mass = P[:, cols].sum(-1)
            inside += mass[labels == region].sum().item()
            total += mass.sum().item()
        assert abs(rows[role]["share"] - inside / total) < 1e-6, role
        assert abs(rows[role]["mass"] - total / 16) < 1e-6


def test_ast_moves_attention_into_the_regions():
    pipe = tiny_pipe("flux")
    kwargs = call_kwargs("flux", steps=2, height=128, width=128)
    shares = {}
    for label, controllers in (("plain", []), ("ast", [AST(LAYOUT)])):
        h = Hierarchy(LAYOUT, steps=[0])
        with attnctl.apply(pipe, *controllers, h):
            run(pipe, PROMPT, **kwargs)
        shares[label] = {(r["block"], r["role"]): r["share"] for r in h.rows}
        assert all(0 <= r["share"] <= 1 for r in h.rows) and {r["step"] for r in h.rows} == {0}
    # tiny FLUX, 4 blocks at depths 0, .25, .5, .75: I2T(instance), I2T(instance ∪ attribute), I2T(attribute)
    for key in [(1, "instance"), (2, "instance"), (2, "attribute"), (3, "attribute")]:
        assert shares["ast"][key] > shares["plain"][key] + 0.2, key
    assert shares["ast"][(0, "instance")] == shares["plain"][(0, "instance")]  # block 0 is untouched


def test_cli_analyze_writes_csv_and_plot(tmp_path, cli):
    layout = ROOT / "examples" / "two_animals.json"
    code, out, err = cli("analyze", "--model", "random:flux-tiny", "--layout", layout, "--steps", "2", "--height", "64",
                         "--width", "64", "--with-ast", "--out", tmp_path)
    assert code == 0, err
    assert {"hierarchy.csv", "hierarchy.png", "image.png", "image_layout.png"} <= {p.name for p in tmp_path.iterdir()}
    with open(tmp_path / "hierarchy.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == 2 * 4 * 3  # steps × blocks × roles
    code, out, err = cli("analyze", "--model", "random:sd15-tiny", "--layout", layout, "--steps", "1", "--with-ast",
                         "--out", tmp_path / "unet")
    assert code == 2 and "use Attention Regulation" in err and "Traceback" not in err
    code, out, err = cli("analyze", "--model", "random:flux-tiny", "--layout", layout, "--ast-w-i2t", "9",
                         "--out", tmp_path / "plain")
    assert code == 2 and "only with --with-ast" in err

"""`attnctl tune` (issue 28, item 4): candidates of a grid over a method's declared options, each paired with the
plain model on the seen split only; the best becomes the model folder's recommendation, which the other commands
then use. Bad input is refused before any model loads."""

import json
import shutil

import pytest

from attnctl.models import BUILTIN_DIR
from attnctl.tune import Candidate, table


@pytest.fixture
def mmdit_copy(tmp_path):
    folder = tmp_path / "shapes-mmdit"
    shutil.copytree(BUILTIN_DIR / "shapes-mmdit", folder)
    return folder


def test_tune_chooses_on_the_seen_split_and_writes_the_recommendation(cli, tmp_path, mmdit_copy):
    before = json.loads((mmdit_copy / "attnctl.json").read_text())["methods"]["layout-modulation"]
    code, out, err = cli("tune", "--method", "layout-modulation", "--model", mmdit_copy, "--set", "weight=1,5",
                         "--set", "hard-mask=false,true", "--prompts", "1", "--seeds", "1", "--steps", "2",
                         "--write", "--out", tmp_path / "tune")
    assert code == 0, err
    chosen = json.loads((tmp_path / "tune" / "tune.json").read_text())["chosen"]
    assert set(chosen) == {"weight", "hard_mask"}
    settings = json.loads((mmdit_copy / "attnctl.json").read_text())
    assert settings["methods"]["layout-modulation"] == {**before, **chosen}  # over the options it ran with
    assert set(before) - set(chosen)  # (some option was not tuned, and stays)
    assert settings["methods"]["ast"] == {"strength": 0.25} and settings["num_inference_steps"] == 25  # kept
    md = (tmp_path / "tune" / "tune.md").read_text()
    assert "seen_placed_pairs" in md and md.count("| weight=") == 4
    prompts = {row.split(",")[3] for row in (tmp_path / "tune" / "tune.csv").read_text().splitlines()[1:]}
    assert all(" and " in p for p in prompts) and len(prompts) == 1  # seen prompts only
    code, out, err = cli("generate", "--method", "layout-modulation", "--model", mmdit_copy, "--auto-layout",
                         "--prompt", "a red circle above a blue square", "--steps", "1", "--out", tmp_path / "gen")
    assert code == 0 and "recommends" in err, err


def test_candidates_are_ordered_by_rate_then_fewest_broken():
    rows = table([Candidate({"weight": 5}, 0.5, 0.25, 3, 1, 0.625, 8)], "seen_placed_pairs")
    assert rows[2] == "| weight=5 | 0.500 | 0.250 | 3 | 1 | 0.625 | 8 |"


@pytest.mark.parametrize("args, message", [
    (["--method", "regulation", "--model", "random:sd15-tiny", "--set", "iterations=5"],
     "is not one (no shapes_training.json)"),
    (["--method", "layout-modulation", "--set", "wieght=1,2"], "layout-modulation has no option 'wieght'"),
    (["--method", "layout-modulation", "--set", "weight"], "write FIELD=V1,V2"),
    (["--method", "layout-modulation", "--set", "weight=-1"], "weight (--lm-weight) must be"),
    (["--method", "layout-modulation", "--set", "weight=1", "--set", "weight=2"], "names weight twice"),
    (["--method", "layout-modulation", "--set", "hard_mask=maybe"], "write true or false"),
    (["--method", "layout-modulation", "--set", "weight=1,2,3,4,5,6,7,8,9", "--set", "power=0,1,2,3,4,5,6,7"],
     "the grid has 72 candidates"),
    (["--method", "layout-modulation", "--prompts", "0"], "--prompts must be between 1 and 20"),
    (["--method", "relocation", "--category", "placed_triples", "--set", "compose=true"],
     "'placed_triples' is not a seen category"),
])
def test_bad_input_is_refused_before_any_model_loads(args, message, cli, tmp_path):
    code, _, err = cli("tune", *args, "--out", tmp_path / "t")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "t").exists()


def test_tune_pools_the_seen_categories_it_is_given(cli, tmp_path, mmdit_copy):
    code, out, err = cli("tune", "--method", "relocation", "--model", mmdit_copy, "--category",
                         "seen_placed_pairs,seen_placed_triples", "--set", "compose=false,true", "--prompts", "1",
                         "--seeds", "1", "--steps", "4", "--out", tmp_path / "tune")
    assert code == 0, err
    md = (tmp_path / "tune" / "tune.md").read_text()
    assert "seen split seen_placed_pairs+seen_placed_triples" in md and md.count("| compose=") == 2
    assert all(line.endswith("| 2 |") for line in md.splitlines() if line.startswith("| compose="))  # pooled: n = 2
    prompts = {row.split(",")[3] for row in (tmp_path / "tune" / "tune.csv").read_text().splitlines()[1:]}
    assert sorted(p.count(" and ") for p in prompts) == [1, 2]  # a seen pair and a seen triple

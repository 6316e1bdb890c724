"""The evaluation suite: held-out prompts, exact scoring of the truth, and the statistics."""

import math

import pytest

from attnctl.eval import CATEGORIES, build_suite, score_case, summarize, wilson
from attnctl.shapes import data


def truth_image(case):
    """The scene the prompt asks for: each object drawn inside the middle of its region."""
    size = data.IMAGE_SIZE
    objects = []
    for (colour, shape), (x0, y0, x1, y1) in zip(case.objects, case.boxes):
        cx, cy = (x0 + x1) / 2 * size, (y0 + y1) / 2 * size
        side = int(0.8 * min(x1 - x0, y1 - y0) * size)
        box = (int(cx - side / 2), int(cy - side / 2), int(cx - side / 2) + side, int(cy - side / 2) + side)
        objects.append(data.ShapeObject(colour, shape, box))
    return data.render(data.Scene(tuple(objects), case.relation, size)).to_pil()


def test_suite_is_held_out_and_covers_every_category():
    cases = build_suite(20)
    for category in CATEGORIES:  # every single object, 20 of each other category
        assert sum(category in c.categories for c in cases) == (15 if category == "single_objects" else 20)
    for case in cases:
        objs = case.objects
        assert len(set(objs)) == len(objs)
        if len(objs) == 2:
            seen = {"seen_pairs", "seen_placed_pairs"} & set(case.categories)
            assert data.is_heldout_pair(objs[0], objs[1]) == (not seen)
        if len(objs) == 3:
            seen = {"seen_triples", "seen_placed_triples"} & set(case.categories)
            assert data.is_heldout_triple(objs) == (not seen)
        for phrase in case.phrases:
            assert phrase in case.prompt


def test_truth_scores_as_success_in_every_category():
    for case in build_suite(20):
        result = score_case(case, truth_image(case))
        assert all(result["success"].values()), (case.prompt, result)


def test_swapped_colours_fail_binding_but_not_presence():
    case = next(c for c in build_suite(20) if "colour_binding" in c.categories)
    (c1, s1), (c2, s2) = case.objects
    swapped = type(case)(case.categories, case.prompt, [(c2, s1), (c1, s2)], case.boxes)
    result = score_case(case, truth_image(swapped))
    assert result["success"] == {"two_objects": True, "colour_binding": False}


def test_objects_in_the_wrong_halves_fail_layout():
    case = next(c for c in build_suite(20) if "layout" in c.categories)
    flipped = type(case)(case.categories, case.prompt, case.objects, case.boxes[::-1], case.relation)
    assert score_case(case, truth_image(flipped))["success"] == {"layout": False}


def test_wilson_interval():
    rate, lo, hi = wilson(50, 100)
    assert rate == 0.5 and lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10)[1] == 0.0 and math.isnan(wilson(0, 0)[0])


def test_summary_counts():
    rows = [{"method": "none (shapes-unet)", "model": "builtin:shapes-unet", "category": "layout", "prompt": "p",
             "seed": i, "success": s, "q90_min": q} for i, (s, q) in enumerate(((1, 0.2), (0, 0.4), (1, float("nan")),
                                                                                (1, 0.6)))]
    summary = summarize(rows)
    assert summary["none (shapes-unet)"]["layout"]["successes"] == 3
    assert summary["none (shapes-unet)"]["layout"]["n"] == 4
    q90 = summary["none (shapes-unet)"]["layout"]["q90_min"]  # NaN (not measured) is left out
    assert q90["mean"] == pytest.approx(0.4)
    half = 1.96 * (((0.2 ** 2 + 0 + 0.2 ** 2) / 3) ** 0.5) / 3 ** 0.5
    assert q90["ci95"] == pytest.approx([0.4 - half, 0.4 + half])


def test_target_coverage_is_the_quantile_of_each_words_attention():
    """TargetCoverage against the definition computed directly in float64 from the recorded probabilities."""
    import torch

    import attnctl
    from attnctl.analysis import TargetCoverage

    from conftest import run, tiny_pipe

    class Probabilities(attnctl.Controller):
        observer = True

        def __init__(self):
            self.calls = []

        def wants(self, site):
            return site.stage == "down_blocks.1"

        def __call__(self, call):
            rows = call.step.cond_rows
            self.calls.append(call.text_probs()[rows].double().mean(dim=1))

    pipe = tiny_pipe("unet")
    prompt = "a red cat and a blue dog"
    coverage = TargetCoverage(["cat", "dog"], sites=lambda s: s.stage == "down_blocks.1")
    probs = Probabilities()
    with attnctl.apply(pipe, coverage, probs, prompt=prompt) as session:
        run(pipe, prompt, height=64, width=64, num_inference_steps=2, num_images_per_prompt=2, output_type="latent")
        positions = [session.prompts[0].word_positions(w) for w in ("cat", "dog")]
    expected = torch.stack([torch.stack([torch.quantile(p[:, :, pos].sum(-1), 0.9, dim=-1) for pos in positions],
                                        dim=1) for p in probs.calls]).mean(0)  # (images, words)
    torch.testing.assert_close(coverage.per_image(), expected, rtol=1e-5, atol=1e-7)
    ratio = expected.min(1).values / expected.max(1).values
    torch.testing.assert_close(coverage.balance(), ratio, rtol=1e-5, atol=1e-7)


def test_suite_runs_with_attention_measurements():
    from attnctl.eval import Arm, run_suite, summarize

    cases = [c for c in build_suite(1) if c.categories == ("layout",)]
    arms = [Arm("none", "builtin:shapes-unet"), Arm("regulation", "builtin:shapes-unet", {"edit_steps": 1}),
            Arm("ast", "builtin:shapes-mmdit", {"tuned_steps": 1})]
    rows = run_suite(arms, cases, [0], steps=2, progress=False)
    assert len(rows) == len(arms) * len(cases)
    # no guidance given: each model's recommended scale (its attnctl.json), not one scale for both
    assert {row["model"]: row["guidance"] for row in rows} == {"builtin:shapes-unet": 3.0, "builtin:shapes-mmdit": 5.0}
    assert {row["steps"] for row in rows} == {2}
    for row in rows:
        unet = "unet" in row["model"]
        assert math.isnan(row["q90_min"]) != unet and math.isnan(row["share_instance"]) == unet
        if unet:
            assert 0 < row["q90_min"] <= row["q90_mean"] <= 1 and 0 < row["balance"] <= 1
        else:
            assert 0 <= row["share_instance"] <= 1
    summary = summarize(rows)
    assert set(summary) == {"none (shapes-unet)", "regulation (shapes-unet)", "ast (shapes-mmdit)"}
    assert "q90_min" in summary["regulation (shapes-unet)"]["layout"]


def test_cli_eval_takes_method_options_and_categories(tmp_path, cli, monkeypatch):
    import csv
    import json

    from attnctl import viz

    titles = []
    draw = viz.eval_figure
    monkeypatch.setattr(viz, "eval_figure", lambda *a, title="", **k: (titles.append(title), draw(*a, title=title,
                                                                                                   **k)))
    monkeypatch.setenv("ATTNCTL_PROGRESS", "0")
    code, out, err = cli("eval", "--methods", "regulation", "--categories", "layout", "--prompts", 1, "--seeds", 1,
                         "--steps", 1, "--edit-steps", 1, "--iterations", 2, "--layers", "down_blocks.0",
                         "--no-attention", "--json", "--out", tmp_path)
    assert code == 0, err
    assert set(json.loads(out)["regulation (shapes-unet)"]) == {"layout"}
    with open(tmp_path / "results.csv") as f:
        assert [row["category"] for row in csv.DictReader(f)] == ["layout"]
    table = (tmp_path / "results.md").read_text()
    assert "--layers down_blocks.0" in table  # the command that produced it
    assert "| method (model) | layout |" in table  # only the categories run
    assert "q90" not in table  # --no-attention: no attention table
    assert titles == ["Shapes world: 1 images on shapes-unet"]
    assert "%|" not in err  # ATTNCTL_PROGRESS=0 silences the per-arm bar


def test_quick_gives_way_to_the_counts_given(tmp_path, cli):
    import json

    code, out, err = cli("eval", "--quick", "--prompts", 2, "--steps", 1, "--methods", "none", "--categories",
                         "layout", "--no-attention", "--json", "--out", tmp_path)
    assert code == 0, err
    assert json.loads(out)["none (shapes-unet)"]["layout"]["n"] == 2  # 2 prompts x the quick 1 seed


def test_none_is_the_baseline_of_the_methods_asked_for(tmp_path, cli):
    import json

    code, out, err = cli("eval", "--methods", "none,ast", "--prompts", 1, "--seeds", 1, "--steps", 1, "--categories",
                         "layout", "--no-attention", "--json", "--out", tmp_path)
    assert code == 0, err
    assert set(json.loads(out)) == {"none (shapes-mmdit)", "ast (shapes-mmdit)"}  # no UNet arm without regulation


def test_time_ratios_without_a_plain_arm_are_none_not_nan():
    from attnctl.eval import time_ratios

    rows = [dict(method=m, model="builtin:shapes-unet", prompt=p, seed=0, seconds=s)
            for m, p, s in (("none (shapes-unet)", "a", 1.0), ("none (shapes-unet)", "b", 3.0),
                            ("regulation (shapes-unet)", "a", 3.0), ("regulation (shapes-unet)", "a", 3.0))]
    assert time_ratios(rows) == {"none (shapes-unet)": {"seconds": 2.0, "ratio": 1.0},
                                 "regulation (shapes-unet)": {"seconds": 3.0, "ratio": 1.5}}
    assert time_ratios(rows[2:]) == {"regulation (shapes-unet)": {"seconds": 3.0, "ratio": None}}


def test_mcnemar_is_the_exact_two_sided_binomial_test_of_the_discordant_pairs():
    from fractions import Fraction
    from math import comb

    from attnctl.eval import mcnemar

    def direct(fixed, broken):  # twice the smaller tail of Binomial(fixed + broken, 1/2), exactly, capped at 1
        n = fixed + broken
        tail = sum(Fraction(comb(n, k), 2**n) for k in range(min(fixed, broken) + 1))
        return float(min(Fraction(1), 2 * tail))

    assert mcnemar(0, 5) == 0.0625 and mcnemar(1, 9) == 2 * 11 / 1024 and mcnemar(0, 0) == 1.0
    assert mcnemar(3, 3) == 1.0 and mcnemar(7, 2) == mcnemar(2, 7)
    for fixed, broken in ((0, 1), (4, 17), (30, 12), (100, 70), (250, 0)):
        assert abs(mcnemar(fixed, broken) - direct(fixed, broken)) <= 1e-15 * max(1.0, direct(fixed, broken))


def test_each_method_is_paired_with_the_plain_model_on_the_same_samples():
    from attnctl.eval import paired_with_plain, summarize

    def row(method, model, prompt, seed, success, category="layout"):
        return {"method": method, "model": model, "category": category, "prompt": prompt, "seed": seed,
                "success": success, "placed": success}

    plain = [(0, 0), (0, 1), (1, 1), (1, 0)]  # (plain, method) per sample: fixed, kept, broken
    rows = [row("none (shapes-mmdit)", "m", f"p{i}", 0, a) for i, (a, _) in enumerate(plain)]
    rows += [row("ast (shapes-mmdit)", "m", f"p{i}", 0, b) for i, (_, b) in enumerate(plain)]
    rows += [row("ast (shapes-mmdit)", "m", "p9", 0, 1)]  # no plain sample: not paired
    rows += [row("regulation (shapes-unet)", "u", "p0", 0, 1)]  # no plain arm on its model: left out
    pairs = paired_with_plain(rows)
    assert pairs == {("ast (shapes-mmdit)", "layout"): {"n": 4, "rate": 0.5, "plain_rate": 0.5, "fixed": 1,
                                                         "broken": 1, "mcnemar_p": 1.0}}
    summary = summarize(rows)
    assert summary["ast (shapes-mmdit)"]["layout"]["paired"] == pairs[("ast (shapes-mmdit)", "layout")]
    assert summary["none (shapes-mmdit)"]["layout"]["placed"]["successes"] == 2


def test_a_subset_of_categories_draws_the_same_images_as_the_full_run():
    from attnctl.eval import Arm, run_suite

    cases = build_suite(1)
    both = [c for c in cases if {"layout", "seen_pairs"} & set(c.categories)]
    alone = [c for c in both if c.categories == ("seen_pairs",)]
    assert both[0] is not alone[0]  # the seen pair is not the first case of the full run
    arm = [Arm("none", "builtin:shapes-unet")]
    keep = ("prompt", "seed", "present", "bound", "mean_iou", "count")
    full = [{k: r[k] for k in keep} for r in run_suite(arm, both, [0, 1], steps=3, progress=False, measure=False)
            if r["category"] == "seen_pairs"]
    part = [{k: r[k] for k in keep} for r in run_suite(arm, alone, [0, 1], steps=3, progress=False, measure=False)]
    assert full == part


def test_a_stopped_run_resumes_from_its_checkpoint_and_generates_only_what_is_missing(tmp_path, monkeypatch):
    import attnctl.run
    from attnctl.eval import Arm, run_suite

    cases = [c for c in build_suite(2) if c.categories == ("seen_pairs",)]
    arms = [Arm("none", "builtin:shapes-unet"), Arm("regulation", "builtin:shapes-unet", {"edit_steps": 1})]
    settings = dict(steps=2, progress=False, measure=False)
    fresh = run_suite(arms, cases, [0, 1], **settings)
    checkpoint = tmp_path / "checkpoint"
    first = run_suite(arms[:1], cases[:1], [0, 1], checkpoint=checkpoint, **settings)  # a run stopped after one case
    with (checkpoint / "rows-0.jsonl").open("a") as f:
        f.write('{"key": "cut by the st')  # a line the stop cut short is skipped
    generated = []
    real = attnctl.run.generate
    monkeypatch.setattr(attnctl.run, "generate", lambda request, *a, **k: generated.append(request) or real(
        request, *a, **k))
    resumed = run_suite(arms, cases, [0, 1], checkpoint=checkpoint, **settings)
    assert len(generated) == 2 * len(cases) - 1  # every case but the finished one
    assert [r["seconds"] for r in resumed if r["prompt"] == cases[0].prompt and r["method"] == arms[0].label] == [
        r["seconds"] for r in first]  # the finished case's rows as they were written

    def outcome(rows):
        return sorted((r["method"], r["prompt"], r["seed"], r["present"], r["bound"]) for r in rows)

    assert outcome(resumed) == outcome(fresh)
    generated.clear()
    again = run_suite(arms, cases, [0, 1], checkpoint=checkpoint, **settings)
    assert generated == [] and outcome(again) == outcome(fresh)
    other_seeds = run_suite(arms[:1], cases[:1], [2], checkpoint=checkpoint, **settings)
    assert len(generated) == 1 and {r["seed"] for r in other_seeds} == {2}  # other samples are not taken for these


def test_eval_resumes_by_default_and_no_resume_starts_afresh(cli, tmp_path):
    out = tmp_path / "eval"
    args = ("eval", "--methods", "none", "--categories", "seen_pairs", "--prompts", "1", "--seeds", "1", "--steps",
            "2", "--no-attention", "--out", out)
    journal = out / "checkpoint" / "rows-0.jsonl"
    assert cli(*args)[0] == 0
    written = journal.read_text()
    assert written.count('"key"') == 1
    assert cli(*args)[0] == 0 and journal.read_text() == written  # resumed: nothing generated, nothing appended
    assert cli(*args, "--no-resume")[0] == 0 and journal.read_text().count('"key"') == 1  # emptied, then written


def test_a_changed_recommendation_makes_new_rows(tmp_path):
    """The checkpoint key holds the model's recommendation for the arm's method: rows made under another one are not
    read back as this one's (an arm without a recommendation keeps its key)."""
    import json
    import shutil

    from attnctl.eval import Arm, _case_key, request_for
    from attnctl.models import BUILTIN_DIR

    folder = tmp_path / "shapes-unet"
    shutil.copytree(BUILTIN_DIR / "shapes-unet", folder)
    case = [c for c in build_suite(1) if "placed_pairs" in c.categories][0]

    def key(method):
        arm = Arm(method, str(folder))
        return _case_key(arm, case, request_for(arm, case, [0], 2, 5.0, "cpu"), False)

    before = {m: key(m) for m in ("none", "relocation")}
    settings = json.loads((folder / "attnctl.json").read_text())
    settings["methods"]["relocation"]["window"] = 0.3
    (folder / "attnctl.json").write_text(json.dumps(settings))
    assert key("relocation") != before["relocation"] and '"window": 0.3' in key("relocation")
    assert key("none") == before["none"] and "recommended" not in before["none"]

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
    for category in CATEGORIES:
        assert sum(category in c.categories for c in cases) == 20
    for case in cases:
        objs = case.objects
        assert len(set(objs)) == len(objs)
        if len(objs) == 2:
            assert data.is_heldout_pair(objs[0], objs[1])
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
    rows = [{"method": "none", "model": "builtin:shapes-unet", "category": "layout", "success": s} for s in (1, 0, 1, 1)]
    summary = summarize(rows)
    assert summary["none (shapes-unet)"]["layout"]["successes"] == 3
    assert summary["none (shapes-unet)"]["layout"]["n"] == 4

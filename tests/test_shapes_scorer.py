"""The exact detector on rendered ground truth, clean and degraded the way samples are."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from attnctl.shapes import data, scorer


def _degrade(image: np.ndarray, seed: int) -> np.ndarray:
    """Mild blur + noise + a small colour drift, like a small generative model's output."""
    rng = np.random.default_rng(seed)
    img = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8))).astype(np.float32)
    img = img + rng.normal(0, 8, img.shape) + rng.normal(0, 10, (1, 1, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _expected(r):
    return [(o.colour, o.shape, m) for o, m in zip(r.scene.objects, r.masks)]


def _accuracy(n: int, degrade: bool, start: int) -> tuple[float, float]:
    exact, ious = 0, []
    for seed in range(start, start + n):
        r = data.render(data.sample_scene(seed))
        img = _degrade(r.image, seed) if degrade else r.image
        s = scorer.score_image(img, _expected(r))
        exact += s.exact
        ious += [o.iou for o in s.objects]
    return exact / n, float(np.mean(ious))


def test_accuracy_on_clean_ground_truth():
    acc, iou = _accuracy(400, degrade=False, start=0)
    assert acc >= 0.99
    assert iou > 0.97


def test_accuracy_on_blurred_noisy_ground_truth():
    acc, iou = _accuracy(400, degrade=True, start=10_000)
    assert acc >= 0.99
    assert iou > 0.85


def test_clean_singles_are_exact_with_full_iou():
    for seed in range(100):
        r = data.render(data.sample_scene(seed, n_objects=1))
        s = scorer.score_image(r.image, _expected(r))
        (o,) = s.objects
        assert o.present and o.bound and o.colour_present and o.correct
        assert o.iou == pytest.approx(1.0)
        assert o.inside_fraction == pytest.approx(1.0)
        assert s.count == 1


def test_wrong_colour_is_present_but_not_bound():
    scene = data.Scene((data.ShapeObject("red", "circle", (10, 10, 40, 40)),))
    r = data.render(scene)
    s = scorer.score_image(r.image, [("blue", "circle")])
    assert s.objects[0].present and not s.objects[0].bound and not s.objects[0].colour_present
    s = scorer.score_image(r.image, [("red", "square")])
    assert not s.objects[0].present and not s.objects[0].bound and s.objects[0].colour_present


def test_swapped_attributes_are_detected():
    scene = data.Scene((data.ShapeObject("red", "square", (4, 20, 26, 42)),
                        data.ShapeObject("blue", "circle", (36, 20, 58, 42))))
    img = data.render(scene).image
    good = scorer.score_image(img, [("red", "square"), ("blue", "circle")])
    assert good.exact and good.all_bound and good.count == 2
    swapped = scorer.score_image(img, [("blue", "square"), ("red", "circle")])
    assert [o.present for o in swapped.objects] == [True, True]
    assert [o.bound for o in swapped.objects] == [False, False]


def test_missing_object_and_extra_objects():
    scene = data.Scene((data.ShapeObject("green", "triangle", (5, 5, 30, 30)),
                        data.ShapeObject("green", "triangle", (35, 35, 60, 60))))
    img = data.render(scene).image
    s = scorer.score_image(img, [("green", "triangle"), ("yellow", "square")])
    assert s.count == 2
    assert s.objects[0].bound
    assert not s.objects[1].present and not s.objects[1].bound
    assert not s.exact
    one = scorer.score_image(img, [("green", "triangle")])
    assert one.objects[0].bound and not one.exact  # an extra object is in the image


def test_blank_image_has_nothing():
    blank = np.full((64, 64, 3), 255, np.uint8)
    s = scorer.score_image(blank, [("red", "circle", (0, 0, 32, 64))])
    assert s.count == 0 and not s.objects[0].present
    assert s.objects[0].iou == 0.0 and s.objects[0].inside_fraction == 0.0


def test_regions_as_boxes_and_fractions_and_relations():
    scene = data.Scene((data.ShapeObject("yellow", "circle", (4, 20, 28, 44)),
                        data.ShapeObject("purple", "square", (38, 22, 58, 42))))
    r = data.render(scene)
    left, right = (0, 0, 32, 64), (0.5, 0.0, 1.0, 1.0)
    s = scorer.score_image(r.image, [("yellow", "circle", left), ("purple", "square", right)])
    assert all(o.correct for o in s.objects)
    assert s.objects[0].inside_fraction == pytest.approx(1.0)
    assert 0 < s.objects[0].iou < 0.5  # the circle fills a small part of the half-image box
    assert scorer.relation_holds(s.objects[0], s.objects[1], "to the left of")
    assert scorer.relation_holds(s.objects[1], s.objects[0], "to the right of")
    assert not scorer.relation_holds(s.objects[0], s.objects[1], "above")
    wrong = scorer.score_image(r.image, [("yellow", "circle", right)])
    assert wrong.objects[0].bound and not wrong.objects[0].correct and wrong.objects[0].inside is False


def test_input_formats_agree():
    r = data.render(data.sample_scene(5, n_objects=2))
    exp = [(o.colour, o.shape) for o in r.scene.objects]
    ref = [o.bound for o in scorer.score_image(r.image, exp).objects]
    pil = scorer.score_image(Image.fromarray(r.image), exp)
    unit = scorer.score_image(r.image.astype(np.float32) / 255.0, exp)
    chw = scorer.score_image(r.image.transpose(2, 0, 1).copy(), exp)
    upscaled = scorer.score_image(Image.fromarray(r.image).resize((256, 256), Image.BILINEAR), exp)
    for s in (pil, unit, chw, upscaled):
        assert [o.bound for o in s.objects] == ref == [True, True]
    with pytest.raises(ValueError):
        scorer.score_image(r.image, [("pink", "circle")])
    with pytest.raises(ValueError):
        scorer.score_image(r.image[:, :, 0], exp)


def test_irregular_and_elongated_blobs_are_no_shape():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:50, 10:20] = data.PALETTE["red"]  # a 10 x 40 bar
    img[10:20, 30:60] = data.PALETTE["blue"]  # an L
    img[10:50, 30:40] = data.PALETTE["blue"]
    s = scorer.score_image(img, [("red", "square"), ("blue", "square")])
    assert sorted(b.shape for b in s.blobs) == ["other", "other"]
    assert s.count == 2
    assert not any(o.present for o in s.objects)
    assert all(o.colour_present for o in s.objects)


def test_a_prompt_is_judged_in_words():
    img = data.render(data.Scene((data.ShapeObject("red", "square", (4, 20, 26, 42)),
                                  data.ShapeObject("blue", "circle", (36, 20, 58, 42))))).image
    assert scorer.objects_of_prompt("a red square and a blue circle") == [("red", "square"), ("blue", "circle")]
    triple = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert scorer.objects_of_prompt("a red circle, a blue square and a green triangle") == triple
    assert scorer.objects_of_prompt("a red circle, a blue square, and a green triangle") == triple
    assert scorer.objects_of_prompt("a red square with a blue circle") is None
    assert scorer.objects_of_prompt("a red square, with a blue circle") is None
    assert scorer.objects_of_prompt("a crimson square") is None
    assert scorer.judged(img, [("red", "square"), ("blue", "circle")]) == "all bound"
    assert scorer.judged(img, [("blue", "square"), ("red", "circle")]) == "mis-bound: blue square, red circle"
    assert scorer.judged(img, [("red", "square"), ("green", "triangle")]) == "missing: green triangle"
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    assert scorer.judged(img, [("red", "square"), ("blue", "circle")], [left, right]) == "all placed"
    assert scorer.judged(img, [("red", "square"), ("blue", "circle")], [right, left]) == \
        "outside its box: red square, blue circle"


def test_a_seed_grid_with_a_layout_is_judged_by_its_regions_phrases():
    """A relation prompt ("... to the left of ...") is no "a X and a Y" prompt: the grid's verdicts come from the
    layout's phrases and boxes (they were blank)."""
    from attnctl.layout import Layout
    from attnctl.run import Request, _judged

    img = data.render(data.Scene((data.ShapeObject("red", "square", (4, 20, 26, 42)),
                                  data.ShapeObject("blue", "circle", (36, 20, 58, 42))))).image
    prompt = "a red square to the left of a blue circle"
    request = Request(method="relocation", layout=Layout.from_prompt(prompt), model="builtin:shapes-unet")
    assert _judged(request, {"plain": [img], "relocation": [img[:, ::-1]]}, [0]) == {
        "plain": ["all placed"], "relocation": ["outside its box: red square, blue circle"]}
    flipped = Request(method="relocation", layout=Layout.from_prompt("a blue circle to the left of a red square"),
                      model="builtin:shapes-unet")
    assert _judged(flipped, {"plain": [img], "relocation": [img]}, [0])["plain"] == [
        "outside its box: blue circle, red square"]


"""The shapes-world generator: determinism, exact masks, captions, the held-out split."""

import itertools

import numpy as np
import pytest

from attnctl.shapes import data


def test_same_seed_same_scene_and_pixels():
    for seed in (0, 1, 17, 123456):
        a, b = data.render(data.sample_scene(seed)), data.render(data.sample_scene(seed))
        assert a.caption == b.caption
        assert a.scene == b.scene
        assert np.array_equal(a.image, b.image)
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_different_seeds_differ():
    images = {data.render(data.sample_scene(s)).image.tobytes() for s in range(50)}
    assert len(images) == 50


def test_image_format():
    r = data.render(data.sample_scene(3))
    assert r.image.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    assert r.image.dtype == np.uint8
    arr = data.images_to_array([r])
    assert arr.shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert arr.min() >= -1.0 and arr.max() <= 1.0


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_masks_are_exactly_the_painted_pixels(seed):
    r = data.render(data.sample_scene(seed))
    union = np.zeros(r.image.shape[:2], dtype=bool)
    for obj, mask in zip(r.scene.objects, r.masks):
        assert mask.any()
        assert not (mask & union).any(), "masks overlap"
        union |= mask
        # every mask pixel has the object's colour
        assert (r.image[mask] == np.array(data.PALETTE[obj.colour], dtype=np.uint8)).all()
        # the mask lies inside the object's box
        x0, y0, x1, y1 = obj.box
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    # everything outside the masks is white background
    assert (r.image[~union] == 255).all()


def test_mask_areas_match_geometry():
    box = (10, 10, 40, 40)  # 30 x 30
    square = data.shape_mask("square", box).sum()
    circle = data.shape_mask("circle", box).sum()
    triangle = data.shape_mask("triangle", box).sum()
    assert square == 900
    assert abs(circle - np.pi * 15**2) / (np.pi * 15**2) < 0.03
    assert abs(triangle - 450) / 450 < 0.06
    with pytest.raises(ValueError):
        data.shape_mask("hexagon", box)


def test_captions_use_the_vocabulary_and_name_the_objects():
    vocab = set(data.VOCABULARY)
    for seed in range(300):
        scene = data.sample_scene(seed)
        cap = scene.caption
        assert set(cap.split()) <= vocab, cap
        for obj in scene.objects:
            assert f"a {obj.colour} {obj.shape}" in cap
        if len(scene.objects) == 1:
            assert cap == f"a {scene.objects[0].colour} {scene.objects[0].shape}"


def test_stated_relations_hold():
    seen = set()
    for seed in range(600):
        scene = data.sample_scene(seed, n_objects=2)
        if scene.relation is None:
            assert " and " in scene.caption
            continue
        seen.add(scene.relation)
        (ax, ay), (bx, by) = scene.objects[0].centre, scene.objects[1].centre
        a, b = scene.objects[0].box, scene.objects[1].box
        if scene.relation == "to the left of":
            assert a[2] <= b[0] and ax < bx
        elif scene.relation == "to the right of":
            assert b[2] <= a[0] and ax > bx
        elif scene.relation == "above":
            assert a[3] <= b[1] and ay < by
        else:
            assert scene.relation == "below"
            assert b[3] <= a[1] and ay > by
    assert seen == set(data.RELATIONS)


def test_pairs_do_not_touch_and_stay_on_canvas():
    for seed in range(300):
        scene = data.sample_scene(seed, n_objects=2)
        (a, b) = (o.box for o in scene.objects)
        assert data._gap_ok(a, b, gap=2)
        assert (scene.objects[0].colour, scene.objects[0].shape) != (scene.objects[1].colour, scene.objects[1].shape)
        for x0, y0, x1, y1 in (a, b):
            assert 0 <= x0 < x1 <= data.IMAGE_SIZE and 0 <= y0 < y1 <= data.IMAGE_SIZE


def test_training_mix_is_singles_pairs_and_triples():
    counts = [len(data.sample_scene(s).objects) for s in range(3000)]
    shares = [counts.count(n) / len(counts) for n in (1, 2, 3)]
    for share, expected in zip(shares, data.TRAIN_COUNTS):
        assert abs(share - expected) < 0.03, shares  # 3000 draws: a standard error below 0.01


def test_triples_do_not_touch_and_keep_their_held_out_split():
    assert 5 <= len(data.HELDOUT_TRIPLES) <= 20
    for triple in data.HELDOUT_TRIPLES:
        assert len({c for c, _ in triple}) == 3 and len({s for _, s in triple}) == 3
        assert not any(data.is_heldout_pair(a, b) for a, b in itertools.combinations(triple, 2))
    for seed in range(400):
        train = data.sample_scene(seed, n_objects=3, split="train").objects
        objs = [(o.colour, o.shape) for o in train]
        assert not data.is_heldout_triple(objs)
        assert len(set(objs)) == 3
        for a, b in itertools.combinations([o.box for o in train], 2):
            assert data._gap_ok(a, b, gap=4)
        held = [(o.colour, o.shape) for o in data.sample_scene(seed, n_objects=3, split="heldout").objects]
        assert data.is_heldout_triple(held)
    scene = data.sample_scene(1, n_objects=3)
    assert scene.caption.count(" and ") == 2 and scene.relation is None


def test_heldout_pairs_never_in_training_and_only_in_heldout():
    assert 10 <= len(data.HELDOUT_PAIRS) <= 40
    all_pairs = {tuple(sorted(p)) for p in itertools.combinations(data.ALL_OBJECTS, 2)}
    assert data.HELDOUT_PAIRS < all_pairs
    for seed in range(1500):
        objs = data.sample_scene(seed, n_objects=2, split="train").objects
        assert not data.is_heldout_pair(*((o.colour, o.shape) for o in objs))
        objs = data.sample_scene(seed, n_objects=2, split="heldout").objects
        assert data.is_heldout_pair(*((o.colour, o.shape) for o in objs))


def test_every_single_object_is_trained():
    seen = {(o.colour, o.shape) for s in range(1000) for o in data.sample_scene(s, n_objects=1).objects}
    assert seen == set(data.ALL_OBJECTS)


def test_bad_arguments():
    with pytest.raises(ValueError):
        data.sample_scene(0, n_objects=4)
    with pytest.raises(ValueError):
        data.sample_scene(0, split="validation")

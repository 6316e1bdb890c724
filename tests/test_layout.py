"""Layouts: rasterising boxes / masks / sketch colours to token grids, binding phrases and roles to tokens, overlays,
and bad input answered with a UsageError that says what is wrong."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnctl import UsageError
from attnctl.layout import Layout
from attnctl.roles import attribute_spans
from attnctl.tokens import PromptTokens
from attnctl.viz import overlay

from conftest import tiny_pipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def layout(regions, prompt="a red dog and a grey cat on the grass", background="the grass", **extra):
    return Layout.from_dict({"prompt": prompt, "background": background, "regions": regions, **extra})


def prompt_tokens(prompt):
    from attnctl.families.flux import FluxFamily

    return PromptTokens(prompt, FluxFamily().text_segments(tiny_pipe("flux")))


def test_boxes_rasterise_by_majority_cover():
    lay = layout([{"phrase": "a red dog", "box": [0, 0, 0.5, 0.5]}, {"phrase": "a grey cat", "box": [0.5, 0.5, 1, 1]}])
    lab = lay.labels((4, 4))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
    assert torch.equal(lab, expected)
    masks = lay.masks((4, 4))
    assert masks.shape == (3, 4, 4) and torch.equal(masks.sum(0), torch.ones(4, 4, dtype=torch.long))
    # a box covering 0.6 of a cell's width takes the cell; 0.4 does not
    lab = layout([{"phrase": "a red dog", "box": [0.1, 0, 1, 1]}]).labels((1, 4))
    assert lab.tolist() == [[1, 1, 1, 1]]
    lab = layout([{"phrase": "a red dog", "box": [0.35, 0, 1, 1]}]).labels((1, 4))
    assert lab.tolist() == [[0, 1, 1, 1]]


def test_small_region_keeps_a_cell_on_coarse_grids():
    lay = layout([{"phrase": "a red dog", "box": [0.6, 0.6, 0.65, 0.65]}])
    assert int((lay.labels((2, 2)) == 1).sum()) == 1
    # cells 38..41 on each axis, the edge ones 0.6 covered: 4 × 4 cells minus the 4 corners (0.36 covered)
    assert int((lay.labels((64, 64)) == 1).sum()) == 12


def test_mask_and_sketch_equal_the_same_boxes(tmp_path):
    boxes = [[0, 0, 0.5, 0.75], [0.5, 0.25, 1, 1]]
    sketch = np.full((64, 64, 3), 255, np.uint8)
    sketch[0:48, 0:32] = (200, 10, 10)
    sketch[16:64, 32:64] = (10, 10, 200)
    Image.fromarray(sketch).save(tmp_path / "sketch.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:128, 64:128] = 255
    Image.fromarray(mask).save(tmp_path / "cat.png")
    data = {"prompt": "a red dog and a grey cat on the grass", "background": "the grass", "sketch": "sketch.png",
            "regions": [{"phrase": "a red dog", "color": "#c80a0a"}, {"phrase": "a grey cat", "mask": "cat.png"}]}
    (tmp_path / "l.json").write_text(json.dumps(data))
    from_files = Layout.load(tmp_path / "l.json")
    from_boxes = layout([{"phrase": "a red dog", "box": boxes[0]}, {"phrase": "a grey cat", "box": boxes[1]}])
    for grid in [(4, 4), (8, 8), (16, 16)]:  # (a grid of another aspect ratio is refused: tested below)
        assert torch.equal(from_files.labels(grid), from_boxes.labels(grid)), grid


def test_examples_load():
    for name in ("two_animals.json", "sketch_layout.json"):
        lay = Layout.load(EXAMPLES / name)
        lab = lay.labels((16, 16))
        assert set(lab.unique().tolist()) == set(range(len(lay.regions) + 1))


def test_phrases_bind_to_tokens_with_roles():
    lay = layout([{"phrase": "a red dog", "box": [0, 0, 0.5, 1]},
                  {"phrase": "a grey cat", "box": [0.5, 0, 1, 1], "attribute": ""}])
    tokens = prompt_tokens(lay.prompt)
    bound = lay.bind(tokens, parser="rules")
    strings = tokens.token_strings
    dog, cat = bound.regions
    assert [strings[p] for p in dog.phrase] == ["a", "red", "dog"]
    assert [strings[p] for p in dog.attribute] == ["red"] and [strings[p] for p in dog.instance] == ["a", "dog"]
    assert cat.attribute == [] and [strings[p] for p in cat.instance] == ["a", "grey", "cat"]
    assert [strings[p] for p in bound.background] == ["the", "grass"]


def test_repeated_phrase_binds_to_the_nth_occurrence():
    lay = layout([{"phrase": "a dog", "box": [0, 0, 0.5, 1]}, {"phrase": "a dog", "box": [0.5, 0, 1, 1]}],
                 prompt="a dog and a dog on the grass")
    tokens = prompt_tokens(lay.prompt)
    bound = lay.bind(tokens, parser="rules")
    first, second = bound.regions
    assert first.phrase == tokens.phrase_positions("a dog", 1)
    assert second.phrase == tokens.phrase_positions("a dog", 2)
    assert first.phrase != second.phrase
    # an explicit occurrence wins, the other region takes the remaining one
    lay = layout([{"phrase": "a dog", "box": [0, 0, 0.5, 1], "occurrence": 2},
                  {"phrase": "a dog", "box": [0.5, 0, 1, 1]}],
                 prompt="a dog and a dog on the grass")
    bound = lay.bind(tokens, parser="rules")
    assert bound.regions[0].phrase == second.phrase and bound.regions[1].phrase == first.phrase
    # a word inside an earlier region's phrase is not reused
    lay = layout([{"phrase": "a red dog", "box": [0, 0, 0.5, 1]}, {"phrase": "dog", "box": [0.5, 0, 1, 1]}],
                 prompt="a red dog and a dog", background="")
    tokens = prompt_tokens(lay.prompt)
    bound = lay.bind(tokens, parser="rules")
    assert bound.regions[1].phrase == tokens.word_positions("dog#2")


@pytest.mark.parametrize("phrase, attribute", [
    ("a red dog", "red"), ("a fluffy white cat", "fluffy white"), ("two cats", None), ("the dog", None),
    ("a teddy bear with a hat", "teddy"), ("an old wooden chair", "old wooden"),
])
def test_rule_roles(phrase, attribute):
    spans = attribute_spans(phrase, parser="rules")
    assert [phrase[a:b] for a, b in spans] == ([attribute] if attribute else [])


@pytest.mark.parametrize("regions, extra, message", [
    ([{"phrase": "a blue bird", "box": [0, 0, 1, 1]}], {}, "'a blue bird'): the phrase is not part of the prompt"),
    ([{"phrase": "a red dog", "box": [0, 0, 0.6, 1]}, {"phrase": "a grey cat", "box": [0.5, 0, 1, 1]}], {},
     "regions 1 ('a red dog') and 2 ('a grey cat') overlap (10.00% of the image)"),
    ([{"phrase": "a red dog", "box": [0.5, 0, 0.5, 1]}], {}, "is empty"),
    ([{"phrase": "a red dog", "box": [0, 0, 1.5, 1]}], {}, "must lie within [0, 1]"),
    ([{"phrase": "a red dog", "color": "#ff0000"}], {}, "needs a 'sketch' PNG"),
    ([{"phrase": "a red dog"}], {}, "give exactly one of box, mask, color"),
    ([{"phrase": "a red dog", "box": [0, 0, 1, 1], "attribute": "blue"}], {}, "attribute 'blue' is not part of"),
    ([{"phrase": "a red dog", "box": [0, 0, 1, 1], "size": 3}], {}, "unknown key(s) ['size']"),
    ([], {}, "'regions' must be a non-empty list"),
    ([{"phrase": "a red dog", "box": [0, 0, 1, 1]}], {"background": "a beach"}, "background phrase 'a beach'"),
])
def test_bad_layouts_raise_usage_errors(regions, extra, message):
    with pytest.raises(UsageError) as err:
        layout(regions, **extra)
    assert message in str(err.value)


def test_bad_sketch_and_mask_files(tmp_path):
    sketch = np.full((32, 32, 3), 255, np.uint8)
    sketch[:, :16] = (0, 128, 0)
    Image.fromarray(sketch).save(tmp_path / "s.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    base = {"prompt": "a red dog and a grey cat", "background": "", "sketch": "s.png"}
    cases = [
        ([{"phrase": "a red dog", "color": "#ff0000"}], "colour #ff0000 does not occur in the sketch s.png; its "
         "colours are: #008000 (50.0%), #ffffff (50.0%) = background"),
        ([{"phrase": "a red dog", "color": "#ffffff"}], "white is the sketch's background"),
        ([{"phrase": "a red dog", "mask": "empty.png"}], "mask is empty"),
        ([{"phrase": "a red dog", "mask": "missing.png"}], "missing.png does not exist"),
    ]
    for regions, message in cases:
        (tmp_path / "l.json").write_text(json.dumps({**base, "regions": regions}))
        with pytest.raises(UsageError) as err:
            Layout.load(tmp_path / "l.json")
        assert message in str(err.value)
    with pytest.raises(UsageError, match="does not exist"):
        Layout.load(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        Layout.load(tmp_path / "bad.json")


def test_phrase_cut_from_the_prompt_or_claimed_twice():
    lay = layout([{"phrase": "a dog", "box": [0, 0, 0.5, 1]}, {"phrase": "a dog", "box": [0.5, 0, 1, 1]}],
                 prompt="a dog on the grass")
    with pytest.raises(UsageError, match="every appearance is already another region"):
        lay.bind(prompt_tokens(lay.prompt), parser="rules")


def test_overlay_enlarges_tints_regions_only_and_labels_below():
    lay = layout([{"phrase": "a red dog", "box": [0, 0, 0.5, 0.5]}])
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    image.putpixel((40, 40), (0, 0, 0))
    out = np.asarray(overlay(image, lay)).astype(int)
    assert out.shape[1] == 256 and out.shape[0] > 256  # 4x, a legend strip below (region + background)
    picture = out[:256]
    # background untouched (no text over the picture), away from the black pixel
    assert (picture[136:156, 136:240] == 128).all() and (picture[168:256, 136:256] == 128).all()
    assert (picture[160:164, 160:164] == 0).all()  # one pixel became a 4x4 block, not smoothed
    assert (picture[80, 80] != 128).any()  # inside the region: tinted
    assert (out[256:] != 255).any()  # the legend


def test_spacy_rule_on_a_parse():
    """The spaCy path (not installed here) on a hand-made parse of "a fluffy white cat with a hat": the attribute is
    the span of the amod/compound/conj children of the first noun chunk's root."""
    from types import SimpleNamespace as T

    from attnctl.roles import _spacy_spans

    phrase = "a fluffy white cat with a hat"
    words = phrase.split()
    starts = [phrase.index(w, sum(len(x) + 1 for x in words[:i])) for i, w in enumerate(words)]
    toks = [T(text=w, idx=s, dep_=d, pos_=p) for w, s, d, p in zip(
        words, starts, ["det", "amod", "amod", "ROOT", "prep", "det", "pobj"],
        ["DET", "ADJ", "ADJ", "NOUN", "ADP", "DET", "NOUN"])]
    root = toks[3]
    for t in toks[:3]:
        t.head = root
    root.head = root
    doc = T(noun_chunks=[_Chunk(toks[:4], root)])
    assert [phrase[a:b] for a, b in _spacy_spans(lambda text: doc, phrase)] == ["fluffy white"]
    doc = T(noun_chunks=[_Chunk([toks[0], toks[3]], root)])
    assert _spacy_spans(lambda text: doc, phrase) == []


class _Chunk(list):
    def __init__(self, tokens, root):
        super().__init__(tokens)
        self.root = root


def _sketch_layout(tmp_path, sketch, regions):
    Image.fromarray(sketch).save(tmp_path / "sketch.png")
    data = {"prompt": "a red dog and a grey cat", "background": "", "sketch": "sketch.png", "regions": regions}
    (tmp_path / "layout.json").write_text(json.dumps(data))
    return tmp_path / "layout.json"


def test_a_sketch_colour_no_region_names_is_reported(tmp_path, caplog):
    sketch = np.full((64, 64, 3), 255, np.uint8)
    sketch[:, :32] = (200, 10, 10)
    sketch[:16, 32:] = (10, 10, 200)  # a quarter of the sketch in a colour that no region names
    sketch[63, 63] = (10, 200, 10)  # one stray pixel: an anti-aliasing speck, not reported
    path = _sketch_layout(tmp_path, sketch, [{"phrase": "a red dog", "color": "#c80a0a"}])
    with caplog.at_level(logging.WARNING, logger="attnctl"):
        Layout.load(path)
    assert [r.getMessage() for r in caplog.records] == [
        "sketch sketch.png: colour(s) #0a0ac8 (12%) belong to no region and count as background; give each object's "
        "colour a region (\"color\": ...) or paint it white"]


def test_a_sketch_of_another_aspect_ratio_is_refused_not_stretched(tmp_path):
    sketch = np.full((32, 64, 3), 255, np.uint8)
    sketch[:, :32] = (200, 10, 10)
    layout = Layout.load(_sketch_layout(tmp_path, sketch, [{"phrase": "a red dog", "color": "#c80a0a"}]))
    assert layout.labels((4, 8)).shape == (4, 8)  # same aspect: fine
    with pytest.raises(UsageError, match=r"its mask or sketch is 64×32 but the image's token grid is 8×8"):
        layout.labels((8, 8))


def test_a_huge_sketch_is_refused_before_it_is_decoded(tmp_path):
    Image.new("RGB", (4097, 4096), "white").save(tmp_path / "sketch.png")
    data = {"prompt": "a red dog", "background": "", "sketch": "sketch.png",
            "regions": [{"phrase": "a red dog", "color": "#c80a0a"}]}
    (tmp_path / "layout.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"is 4097×4096 pixels, more than the 16,777,216 a layout reads"):
        Layout.load(tmp_path / "layout.json")

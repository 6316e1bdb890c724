"""Property-based tests (Hypothesis) of everything a user hands to attnctl: layout files and dicts, and the public
constructors and configs. Whatever the input — any JSON value, any box, any sketch or mask file, any keyword value —
the answer is a working object or a `UsageError` that says what to fix, never another exception; and what is accepted
is sane (finite numbers of the right kind, non-empty words, boxes inside the image)."""

import dataclasses
import json
import math
import numbers
import tempfile
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import attnctl
from attnctl import (
    AST,
    ASTConfig,
    Capture,
    CaptureConfig,
    Hierarchy,
    Layout,
    Regulation,
    RegulationConfig,
    UsageError,
    devices,
    models,
)
from attnctl.analysis import TargetCoverage
from attnctl.config import build, check, default_of
from attnctl.layout import Region
from attnctl.methods.ast import Band, parse_schedule

EXAMPLES = 150
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --- values ---------------------------------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([63, 64, 1100]).flatmap(lambda e: st.sampled_from([2**e, -(2**e) - 1]))  # 2**1100: no float
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-320, 1e308]),
    st.text(max_size=12), st.sampled_from(["", " ", "\x00", "\ud800", "é猫", "#ff0000", "1,2", "0-9", "nan"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


class _Weird:
    def __repr__(self):
        return "<weird>"


ODD_VALUES = st.one_of(
    st.tuples(JSON_SCALARS, JSON_SCALARS), st.frozensets(st.integers(-3, 30), max_size=3), st.binary(max_size=6),
    st.complex_numbers(max_magnitude=10), st.fractions(max_denominator=7), st.decimals(allow_nan=True),
    st.sampled_from([
        np.float32("nan"), np.float64(0.5), np.int64(3), np.bool_(True), np.array([1.0, 2.0]), np.array(1.0),
        np.array(["fast"]), torch.tensor(2.0), torch.tensor([1, 2]), range(3), range(-2, 2), Path("."), _Weird(),
        object(), Decimal("1e999"), Fraction(1, 3), float, print, lambda site: True, b"", bytearray(b"x"), {1, 2},
        (), [], {}, [[]], [1, "a"], ("cat", "dog"),
    ]),
)
ANYTHING = st.one_of(JSON_VALUES, ODD_VALUES)


def chance(tenths: float):
    """True in about `tenths` of ten draws. Hypothesis favours the bounds of integers(0, 9) and its simplest choice
    (the first) of sampled_from, so the likelier outcome is put first."""
    if tenths >= 5:
        return st.sampled_from(range(20)).map(lambda i: i < 2 * tenths)
    return st.sampled_from(range(20)).map(lambda i: i >= 20 - 2 * tenths)


def mostly(good, bad, tenths: float = 7):
    """`good` in about `tenths` of ten draws, else `bad` (st.one_of favours its last branches here)."""
    return chance(tenths).flatmap(lambda pick: good if pick else bad)
WORDS = st.sampled_from(["cat", "dog", "a red dog", "grass", "", " ", "Cat", "dog#2", "é", "\x00", "a,b"])


def word_lists(inner=WORDS):
    return st.one_of(st.lists(inner, max_size=4), st.tuples(inner), inner.map(lambda w: [[w]]),
                     st.lists(st.lists(inner, max_size=3), max_size=3))


def ok_or_usage_error(make, *args, **kwargs):
    """Calls make(...): its result, or None when it raised a UsageError; any other exception fails the test."""
    try:
        return make(*args, **kwargs)
    except UsageError as err:
        assert str(err).strip(), "a UsageError must say what is wrong"
        return None


def built_config(cls, options):
    """`options` (known fields, unknown names) through `build` and the dataclass: every option as a dict, and the
    config of the known ones (None when refused); anything but a UsageError fails the test."""
    known, unknown = options
    everything = {**known, **unknown}
    ok_or_usage_error(build, cls, None, **everything)
    return everything, ok_or_usage_error(cls, **known)


# --- layouts: files and dicts ------------------------------------------------------------------------------------

PROMPT = "a red dog and a grey cat on the grass"
PHRASES = mostly(st.sampled_from(["a red dog", "a grey cat", "the grass", "dog", "RED DOG", "cat on", "a"]),
                 st.one_of(JSON_VALUES, st.sampled_from(["", " ", "a blue dog", "\x00"])))
MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")
COLOURS = st.tuples(*[st.integers(0, 255)] * 3)


@st.composite
def images(draw, max_side=12):
    """(mode, uint8 array h×w×3) of a small picture made of a few flat colours (white often among them)."""
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    palette = draw(st.lists(mostly(COLOURS, st.just((255, 255, 255)), 6), min_size=1, max_size=4, unique=True))
    index = draw(st.lists(st.integers(0, len(palette) - 1), min_size=h * w, max_size=h * w))
    pixels = np.array([palette[i] for i in index], np.uint8).reshape(h, w, 3)
    return draw(mostly(st.just("RGB"), st.sampled_from(MODES), 5)), pixels


FILES = mostly(st.tuples(st.just("png"), images()), st.one_of(
    st.tuples(st.just("truncated"), images()), st.tuples(st.just("dir"), st.none()),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("bytes"), st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b))), 8)
FILE_NAMES = ("sketch.png", "mask1.png", "mask2.png", "other.png")
PATHS = mostly(st.sampled_from(FILE_NAMES + ("missing.png", "", ".", "/", "sub/", "\x00.png", "\ud800.png",
                                             "x" * 5000, "sketch.png/x")), JSON_VALUES)


def write_file(folder: Path, name: str, spec) -> None:
    kind, payload = spec
    path = folder / name
    if kind == "dir":
        path.mkdir()
    elif kind == "bytes":
        path.write_bytes(payload)
    else:
        mode, pixels = payload
        image = Image.fromarray(pixels)
        if mode == "I;16":  # 16-bit grey
            image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
        else:
            image = image.convert(mode)
        image.save(path, format="PNG")
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])


@st.composite
def boxes(draw, slot=(0, 1)):
    """Mostly boxes inside the image (in their own vertical strip of `slot` = (i, n), so regions need not overlap),
    else four or more arbitrary numbers, or anything."""
    if draw(chance(6)):
        i, n = slot
        x0, y0 = draw(st.integers(0, 9)), draw(st.integers(0, 9))
        x1, y1 = draw(st.integers(x0 + 1, 10)), draw(st.integers(y0 + 1, 10))
        return [(i + x0 / 10) / n, y0 / 10, (i + x1 / 10) / n, y1 / 10]
    number = st.one_of(st.floats(0, 1), st.integers(-2, 2), st.floats(), HUGE_INTS, st.booleans(), st.text(max_size=2),
                       st.none())
    return draw(mostly(st.lists(number, min_size=4, max_size=4),
                       st.one_of(st.lists(number, max_size=6), JSON_VALUES), 6))


def colours(palette):
    good = st.sampled_from(palette).flatmap(lambda c: st.sampled_from(["#{:02x}{:02x}{:02x}".format(*c), list(c)])) \
        if palette else st.nothing()
    bad = st.one_of(
        st.text(alphabet="0123456789abcdefABCDEF+- _xg", min_size=6, max_size=6).map(lambda s: "#" + s),
        st.sampled_from(["#-1-1-1", "#+1+1+1", "# 1 1 1", "#0x1234", "#ffffff", "#FF0000", "red", "#fff", "#٣٣٣٣٣٣"]),
        st.lists(st.one_of(st.integers(-300, 300), st.booleans(), st.floats(0, 255)), min_size=3, max_size=3),
        JSON_VALUES,
    )
    return mostly(good, bad, 6) if palette else bad


@st.composite
def regions(draw, index, count, palette):
    region = {"phrase": draw(PHRASES)} if draw(chance(9)) else {}
    kind = draw(st.sampled_from(["box"] * 4 + ["mask", "color", "color", "none", "several"]))
    if kind in ("box", "several"):
        region["box"] = draw(boxes((index, count)))
    if kind in ("mask", "several"):
        region["mask"] = draw(mostly(st.sampled_from(["mask1.png", "mask2.png"]), PATHS))
    if kind in ("color", "several"):
        region["color"] = draw(colours(palette))
    if draw(chance(2)):
        region["attribute"] = draw(mostly(st.sampled_from(["red", "", "grey", "RED", ["red"], []]),
                                          st.one_of(word_lists(), JSON_VALUES, st.just("blue"))))
    if draw(chance(1)):
        region["occurrence"] = draw(st.one_of(st.integers(-1, 3), st.booleans(), HUGE_INTS, JSON_VALUES))
    if draw(chance(0.5)):
        region[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return region


@st.composite
def layout_cases(draw):
    """(files to write next to the layout, the layout's JSON value): valid-looking layouts, perturbed."""
    files = {name: draw(FILES) for name in FILE_NAMES if draw(chance(8))}
    sketch = files.get("sketch.png")
    palette = []
    if sketch is not None and sketch[0] == "png":
        palette = sorted({tuple(int(v) for v in c) for c in sketch[1][1].reshape(-1, 3)} - {(255, 255, 255)})
    data = {}
    if draw(chance(9.5)):
        data["prompt"] = PROMPT if draw(chance(8)) else draw(st.one_of(st.just(PROMPT.upper()), JSON_VALUES))
    count = draw(st.integers(1, 3))
    if draw(chance(9.5)):
        data["regions"] = ([draw(regions(i, count, palette)) for i in range(count)] if draw(chance(9))
                           else draw(st.one_of(st.just([]), JSON_VALUES)))
    if draw(chance(5)):
        data["background"] = draw(mostly(st.sampled_from(["the grass", "", "GRASS", "on the"]),
                                         st.one_of(st.just("a beach"), JSON_VALUES)))
    if sketch is not None and draw(chance(9)) or draw(chance(1)):
        data["sketch"] = "sketch.png" if draw(chance(8)) else draw(PATHS)
    if draw(chance(0.5)):
        data[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return files, data if draw(chance(9)) else draw(JSON_VALUES)


def assert_sane_layout(layout: Layout) -> None:
    """What a loaded layout guarantees to the code that uses it."""
    assert isinstance(layout.prompt, str) and layout.prompt.strip()
    assert isinstance(layout.background, str)
    assert layout.regions and all(isinstance(r, Region) for r in layout.regions)
    for r in layout.regions:
        assert isinstance(r.phrase, str) and r.phrase.strip() and r.phrase.strip().lower() in layout.prompt.lower()
        if r.box is not None:
            assert r.mask is None and len(r.box) == 4 and all(type(v) is float and 0 <= v <= 1 for v in r.box)
            assert r.box[0] < r.box[2] and r.box[1] < r.box[3]
        else:
            assert isinstance(r.mask, np.ndarray) and r.mask.dtype == bool and r.mask.ndim == 2 and r.mask.any()
        if r.color is not None:
            assert all(type(c) is int and 0 <= c <= 255 for c in r.color) and len(r.color) == 3
        assert r.occurrence is None or (type(r.occurrence) is int and r.occurrence >= 1)
        assert r.attribute is None or isinstance(r.attribute, str) or (
            isinstance(r.attribute, list) and all(isinstance(a, str) for a in r.attribute))


def _no_json_bools(value) -> bool:
    return not isinstance(value, bool) and (not isinstance(value, list) or all(_no_json_bools(v) for v in value))


@SETTINGS
@given(case=layout_cases(), grid=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_a_layout_file_loads_or_raises_a_usage_error(case, grid):
    files, data = case
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name, spec in files.items():
            write_file(folder, name, spec)
        (folder / "layout.json").write_text(json.dumps(data), encoding="utf-8")
        layout = ok_or_usage_error(Layout.load, folder / "layout.json")
    if layout is None:
        return
    assert_sane_layout(layout)
    for region in data["regions"]:  # JSON's true/false are not numbers here
        assert all(_no_json_bools(region.get(key)) for key in ("box", "color", "occurrence"))
    labels = ok_or_usage_error(layout.labels, grid)  # a region too small for the grid is a UsageError
    if labels is not None:
        assert labels.shape == grid and 0 <= int(labels.min()) and int(labels.max()) <= len(layout.regions)


REGION_FIELDS = {
    "phrase": st.one_of(PHRASES, JSON_VALUES),
    "box": st.one_of(boxes(), st.lists(st.one_of(st.floats(0, 1), st.booleans(), HUGE_INTS, st.floats()), min_size=4,
                                       max_size=4), st.sampled_from([[0, 0, True, True], [0, 0, 2**1100, 1]])),
    "mask": st.one_of(st.just("mask.png"), PATHS),
    "color": st.one_of(colours([(200, 10, 10)]), st.sampled_from([[True, 0, 0], [-1, 0, 0], [256, 0, 0], [1.0, 2, 3]])),
    "attribute": st.one_of(st.sampled_from(["red", ["red"], "", "blue"]), JSON_VALUES),
    "occurrence": st.one_of(st.integers(-1, 3), st.booleans(), HUGE_INTS, JSON_VALUES),
}


@SETTINGS
@given(field=st.sampled_from(sorted(REGION_FIELDS)).flatmap(lambda k: st.tuples(st.just(k), REGION_FIELDS[k])),
       shape=st.sampled_from([("box", [0, 0, 0.5, 1]), ("color", "#c80a0a"), ("mask", "mask.png")]))
def test_any_value_of_one_region_field_loads_or_raises_a_usage_error(field, shape):
    """One field of an otherwise valid region (given by a box, a sketch colour or a mask file) set to anything."""
    key, value = field
    region = {"phrase": "a red dog", **({} if key in ("box", "mask", "color") else dict([shape])), key: value}
    data = {"prompt": PROMPT, "sketch": "sketch.png",
            "regions": [region, {"phrase": "a grey cat", "box": [0.5, 0, 1, 1]}]}
    with tempfile.TemporaryDirectory() as folder:
        sketch = np.full((4, 4, 3), 255, np.uint8)
        sketch[:, :2] = (200, 10, 10)
        Image.fromarray(sketch).save(Path(folder) / "sketch.png")
        Image.fromarray(np.where(sketch[..., 1] == 10, 255, 0).astype(np.uint8)).save(Path(folder) / "mask.png")
        (Path(folder) / "layout.json").write_text(json.dumps(data))
        layout = ok_or_usage_error(Layout.load, Path(folder) / "layout.json")
    if layout is not None:
        assert_sane_layout(layout)
        assert _no_json_bools(region.get("box")) and _no_json_bools(region.get("color"))
        assert not isinstance(region.get("occurrence"), bool)


@SETTINGS
@given(data=JSON_VALUES)
def test_any_json_value_is_a_layout_or_a_usage_error(data):
    layout = ok_or_usage_error(Layout.from_dict, data)
    if layout is not None:
        assert_sane_layout(layout)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["prompt", "regions", "background", "sketch"]), ANYTHING),
       region=st.dictionaries(st.sampled_from(["phrase", "box", "mask", "color", "attribute", "occurrence"]),
                              ANYTHING),
       key=st.one_of(st.none(), st.integers(), st.tuples(st.integers())))
def test_any_python_values_in_a_layout_dict_are_a_layout_or_a_usage_error(data, region, key):
    if "regions" not in data:
        data["regions"] = [region]
    if key is not None:  # dicts built in Python may have keys JSON cannot
        data[key] = 1
    layout = ok_or_usage_error(Layout.from_dict, data)
    if layout is not None:
        assert_sane_layout(layout)


@SETTINGS
@given(content=st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40),
    st.sampled_from([b"[" * 5000, b"{\"prompt\": " * 3000, b"1" * 5000, b"-" + b"9" * 4400, b"NaN", b"\xff\xfe",
                     b"\xef\xbb\xbf{}", b"", b"\"\\ud800\""]),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    path=st.one_of(st.just("layout.json"), PATHS, ODD_VALUES))
def test_any_file_or_path_is_a_layout_or_a_usage_error(content, path):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "layout.json").write_bytes(content)
        (Path(folder) / "sub").mkdir()
        if isinstance(path, str) and path and "\x00" not in path and not path.startswith("/"):
            path = str(Path(folder) / path)
        layout = ok_or_usage_error(Layout.load, path)
        if layout is not None:
            assert_sane_layout(layout)
        loaded = ok_or_usage_error(attnctl.layout.load_layout, path)
        if loaded is not None:
            assert_sane_layout(loaded)


@st.composite
def region_objects(draw):
    fields = {"phrase": draw(mostly(PHRASES, ANYTHING))}
    masks = st.sampled_from([np.ones((3, 3), bool), np.zeros((2, 2), bool), np.ones(4, bool), np.ones((2, 2)), "m.png"])
    for name, values in (("box", boxes().map(lambda b: tuple(b) if isinstance(b, list) else b)), ("mask", masks),
                         ("color", colours([(1, 2, 3)])), ("attribute", st.sampled_from(["red", ["red"], ""])),
                         ("occurrence", st.integers(-1, 3))):
        if draw(chance(3)):
            fields[name] = draw(mostly(values, ANYTHING))
    return Region(**fields)


@SETTINGS
@given(prompt=mostly(st.just(PROMPT), ANYTHING), regions=mostly(st.lists(region_objects(), max_size=3), ANYTHING),
       background=mostly(st.just("the grass"), ANYTHING), sketch_path=mostly(st.none(), ANYTHING))
def test_the_layout_constructor_takes_anything_or_raises_a_usage_error(prompt, regions, background, sketch_path):
    layout = ok_or_usage_error(Layout, prompt=prompt, regions=regions, background=background, sketch_path=sketch_path)
    if layout is not None:
        assert_sane_layout(layout)


@st.composite
def valid_layouts(draw):
    """Layouts that must load: phrases of the prompt, boxes (or sketch colours) in their own vertical strips."""
    phrases = draw(st.lists(st.sampled_from(["a red dog", "a grey cat", "the grass"]), min_size=1, max_size=3,
                            unique=True))
    n, sketch = len(phrases), draw(st.booleans())
    palette = draw(st.lists(COLOURS.filter(lambda c: c != (255, 255, 255)), min_size=n, max_size=n, unique=True))
    pixels = np.full((8, 4 * n, 3), 255, np.uint8)
    regions = []
    for i, phrase in enumerate(phrases):
        x0 = draw(st.integers(0, 9))
        x1, y0 = draw(st.integers(x0 + 1, 10)), draw(st.integers(0, 9))
        y1 = draw(st.integers(y0 + 1, 10))
        region = {"phrase": draw(st.sampled_from([phrase, phrase.upper(), " " + phrase]))}
        if sketch:
            pixels[draw(st.integers(0, 7)), 4 * i + draw(st.integers(0, 3))] = palette[i]
            region["color"] = draw(st.sampled_from(["#{:02x}{:02x}{:02x}".format(*palette[i]), list(palette[i])]))
        else:
            region["box"] = [(i + x0 / 10) / n, y0 / 10, (i + x1 / 10) / n, y1 / 10]
        if draw(st.booleans()):
            region["attribute"] = draw(st.sampled_from(["", phrase.split()[1], [phrase.split()[1]], []]))
        regions.append(region)
    data = {"prompt": PROMPT, "regions": regions}
    if draw(st.booleans()):
        data["background"] = draw(st.sampled_from(["", "the grass", "on the grass"]))
    return data, pixels if sketch else None


@SETTINGS
@given(case=valid_layouts())
def test_valid_layouts_load_and_round_trip(case):
    data, pixels = case
    with tempfile.TemporaryDirectory() as folder:
        if pixels is not None:
            Image.fromarray(pixels).save(Path(folder) / "sketch.png")
            data["sketch"] = "sketch.png"
        (Path(folder) / "layout.json").write_text(json.dumps(data))
        layout = Layout.load(Path(folder) / "layout.json")
        assert_sane_layout(layout)
        assert Layout.from_dict(layout.to_dict(), base=folder).to_dict() == layout.to_dict()


# --- method configs and constructors --------------------------------------------------------------------------

def plausible(field: dataclasses.Field):
    """Values near what an option accepts (its default, numbers within its bounds, its choices), so that the
    accepted side of every option is explored too."""
    meta, default = field.metadata, default_of(field)
    options = [st.just(default)]
    if meta.get("choices"):
        options.append(st.sampled_from(meta["choices"]))
    if isinstance(default, bool):
        options.append(st.booleans())
    elif isinstance(default, (int, float)) or meta.get("parse") in (int, float):
        low, high = meta.get("low"), meta.get("high")
        options += [st.integers(int(low) if low is not None else -5, int(high) if high is not None else 10**4),
                    st.floats(float(low) if low is not None else -5.0, float(high) if high is not None else 1e4)]
    return st.one_of(*options)


def option_values(config_class, extra: dict | None = None):
    """(known, unknown): kwargs for any subset of the config's options (plausible values or anything), and now and
    then an unknown name (the dataclass itself refuses those with a TypeError, as any Python class; `build` and the
    controllers, which take options by name, must answer a UsageError)."""
    fields = {f.name: mostly(st.one_of(plausible(f), (extra or {}).get(f.name, st.nothing())), ANYTHING, 6)
              for f in dataclasses.fields(config_class)}
    known = st.fixed_dictionaries({}, optional=fields)
    unknown = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in fields), ANYTHING, max_size=1)
    return st.tuples(known, mostly(st.just({}), unknown, 8))


def assert_sane_config(config) -> None:
    """What `check` promises of every accepted config: finite numbers of their kind within bounds, valid choices."""
    check(config)
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), default_of(field)
        if isinstance(default, bool):
            assert type(value) is bool
        elif isinstance(default, int):
            assert type(value) is int, f"{field.name} = {value!r} is accepted but not an int"
        elif isinstance(default, float):
            assert isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value), \
                f"{field.name} = {value!r}"


def non_empty_words(words) -> bool:
    return isinstance(words, list) and words and all(isinstance(w, str) and w.strip() for w in words)


STEPS = mostly(st.one_of(st.lists(st.integers(0, 40), max_size=4), st.just(range(5)), st.just("0-9,12")),
               st.one_of(st.integers(-2, 40), st.lists(st.integers(-2, 40), max_size=4),
                         st.lists(st.floats(-1, 5), max_size=3), st.lists(st.text(max_size=2), max_size=2)), 5)
SCHEDULES = mostly(
    st.lists(st.fixed_dictionaries(
        {"from": mostly(st.floats(0, 1), JSON_SCALARS), "to": mostly(st.floats(0, 1), JSON_SCALARS)},
        optional={"blocks": mostly(st.lists(st.sampled_from(["i2i", "t2t", "i2t", "I2I", "x"])), JSON_VALUES),
                  "roles": mostly(st.lists(st.sampled_from(["instance", "attribute", "background", "x"])), JSON_VALUES),
                  "role": JSON_VALUES}), max_size=3),
    st.lists(JSON_VALUES, max_size=2), 8,
).flatmap(lambda bands: st.sampled_from([bands, json.dumps(bands, allow_nan=True)]))


@SETTINGS
@given(options=option_values(RegulationConfig, {
    "targets": word_lists(), "layers": word_lists(st.sampled_from(["down_blocks.2", "all", "", "up_blocks.1"])),
    "edit_steps": STEPS}), targets=mostly(st.one_of(st.none(), word_lists()), ANYTHING), positional=st.booleans())
def test_regulation_takes_any_options_or_raises_a_usage_error(options, targets, positional):
    options, config = built_config(RegulationConfig, options)
    if config is not None:
        assert_sane_config(config)
        assert config.targets is None or non_empty_words(config.targets) or all(
            non_empty_words(t) for t in config.targets)
        assert config.layers is None or (isinstance(config.layers, tuple) and config.layers
                                         and all(isinstance(x, str) and x.strip() for x in config.layers))
        steps = config.edit_steps
        assert steps is None or (type(steps) is int and steps >= 0) or (
            isinstance(steps, tuple) and all(type(s) is int and s >= 0 for s in steps))
    options.pop("targets", None)  # given as the argument
    regulation = (ok_or_usage_error(Regulation, targets, **options) if positional
                  else ok_or_usage_error(Regulation, targets=targets, **options))
    if regulation is not None:
        assert_sane_config(regulation.config)
    base = RegulationConfig(targets=["cat"])
    with_config = ok_or_usage_error(Regulation, config=base, **options)
    if with_config is not None:
        assert_sane_config(with_config.config)


@st.composite
def valid_schedules(draw):
    bands = []
    for _ in range(draw(st.integers(0, 8))):
        n = draw(st.integers(1, 60))
        start = draw(st.integers(0, n - 1))
        stop = draw(st.integers(start + 1, n))
        band = {"from": start / n, "to": stop / n}
        blocks = ["i2i", "t2t", "i2t"]  # the default
        if draw(st.booleans()):
            blocks = band["blocks"] = draw(st.lists(st.sampled_from(blocks), unique=True))
        roles = draw(st.lists(st.sampled_from(list(attnctl.roles.ROLES)), unique=True,
                              min_size=1 if "i2t" in blocks else 0))
        if roles or draw(st.booleans()):
            band["roles"] = roles
        bands.append(band)
    return bands


@SETTINGS
@given(bands=valid_schedules())
def test_valid_schedules_are_taken_as_lists_json_text_and_files(bands):
    expected = parse_schedule(bands)
    assert parse_schedule(json.dumps(bands)) == expected  # JSON text of any length (not taken for a file name)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "schedule.json").write_text(json.dumps(bands))
        assert ASTConfig(schedule=str(Path(folder) / "schedule.json")).schedule == expected


LAYOUT = {"prompt": PROMPT, "background": "the grass",
          "regions": [{"phrase": "a red dog", "box": [0, 0, 0.5, 1]}, {"phrase": "a grey cat", "box": [0.5, 0, 1, 1]}]}


@SETTINGS
@given(options=option_values(ASTConfig, {"schedule": SCHEDULES}),
       layout=mostly(st.just(LAYOUT), st.one_of(st.just("nowhere.json"), ANYTHING), 8))
def test_ast_takes_any_options_or_raises_a_usage_error(options, layout):
    options, config = built_config(ASTConfig, options)
    if config is not None:
        assert_sane_config(config)
        assert isinstance(config.schedule, tuple) and all(
            isinstance(b, Band) and 0 <= b.start < b.stop <= 1 and set(b.roles) <= set(attnctl.roles.ROLES)
            for b in config.schedule)
    ast = ok_or_usage_error(AST, layout, **options)
    if ast is not None:
        assert_sane_config(ast.config)
        assert_sane_layout(ast.layout)


@SETTINGS
@given(options=option_values(CaptureConfig, {"words": word_lists(), "steps": STEPS,
                                              "sites": st.sampled_from([["down_blocks.2.attentions.0"], ("a", "b"),
                                                                        lambda site: True])}),
       words=mostly(st.one_of(st.none(), word_lists(), WORDS), ANYTHING), requested=mostly(st.booleans(), ANYTHING))
def test_capture_takes_any_words_and_options_or_raises_a_usage_error(options, words, requested):
    options, config = built_config(CaptureConfig, options)
    if config is not None:
        assert non_empty_words(config.words)
        assert config.steps is None or all(type(s) is int and s >= 0 for s in config.steps)
        sites = config.sites
        assert sites is None or callable(sites) or (not isinstance(sites, str)
                                                    and all(isinstance(s, str) for s in sites))
    options.pop("words", None)  # given as the argument
    capture = ok_or_usage_error(Capture, words, requested=requested, **options)
    if capture is not None:
        assert non_empty_words(capture.words) and type(capture.requested) is bool


@SETTINGS
@given(layout=mostly(st.just(LAYOUT), ANYTHING, 8), steps=mostly(st.one_of(st.none(), STEPS), ANYTHING),
       role_parser=mostly(st.sampled_from(["auto", "spacy", "rules"]), ANYTHING))
def test_hierarchy_takes_anything_or_raises_a_usage_error(layout, steps, role_parser):
    hierarchy = ok_or_usage_error(Hierarchy, layout, steps=steps, role_parser=role_parser)
    if hierarchy is not None:
        assert hierarchy.role_parser in ("auto", "spacy", "rules")
        assert hierarchy.steps is None or all(type(s) is int and s >= 0 for s in hierarchy.steps)


@SETTINGS
@given(words=mostly(st.one_of(word_lists(), WORDS), ANYTHING), steps=mostly(st.one_of(st.none(), STEPS), ANYTHING),
       sites=mostly(st.sampled_from([None, lambda site: True]), ANYTHING),
       quantile=mostly(st.floats(0, 1), ANYTHING))
def test_target_coverage_takes_anything_or_raises_a_usage_error(words, steps, sites, quantile):
    coverage = ok_or_usage_error(TargetCoverage, words, sites=sites, steps=steps, quantile=quantile)
    if coverage is not None:
        assert non_empty_words(coverage.words)
        assert coverage.site_filter is None or callable(coverage.site_filter)
        assert coverage.steps is None or all(type(s) is int and s >= 0 for s in coverage.steps)
        assert type(coverage.quantile) is float and 0 <= coverage.quantile <= 1


class _Loaded(Exception):
    """Raised by the stand-in model loaders: load_pipeline got past its argument checks."""


SPECS = ["random:sd15-tiny", "random:flux?double=2&single=4", "random:sd3?layers=0", "random:sd3?layers=4&x=1",
         "random:flux-tiny?double=", "random:sd3?layers=²", "random:nope", "random:", "builtin:nope", "builtin:",
         "builtin:../..", "builtin:shapes-unet", "a/b", "", Path("some/folder")]


@SETTINGS
@given(spec=mostly(st.one_of(st.sampled_from(SPECS), st.text(max_size=12).map(lambda t: "random:sd3?" + t)), ANYTHING),
       device=mostly(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:-1", "gpu", "", "cpu:0", "meta",
                                      torch.device("cpu")]), ANYTHING),
       dtype=mostly(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, "fp16", "float32",
                                     "half", "bf16"]), ANYTHING),
       seed=mostly(st.one_of(st.integers(), HUGE_INTS), ANYTHING))
def test_load_pipeline_checks_its_arguments_before_loading(spec, device, dtype, seed):
    def stand_in(*args, **kwargs):
        raise _Loaded

    with mock.patch.dict(models._RANDOM_BUILDERS, {k: stand_in for k in models._RANDOM_BUILDERS}), \
            mock.patch.object(models, "_from_pretrained", stand_in):
        try:
            ok_or_usage_error(models.load_pipeline, spec, device=device, dtype=dtype, seed=seed)
        except _Loaded:  # it got as far as loading: then every argument was fine
            assert isinstance(spec, Path) or isinstance(spec, str) and spec.strip()
            torch.device(device)
            assert (isinstance(dtype, str) and dtype in devices.DTYPES
                    or isinstance(dtype, torch.dtype) and dtype.is_floating_point)
            assert isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
            return


# --- what the properties found, kept as plain examples ----------------------------------------------------------

@pytest.mark.parametrize("data", [
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "box": [0, 0, 2**1100, 1]}]},  # OverflowError
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "box": [False, False, True, True]}]},  # accepted
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "box": [0, 0, 1, 1], "attribute": 5}]},  # TypeError
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "box": [0, 0, 1, 1], "attribute": {}}]},  # accepted
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "box": [0, 0, 1, 1], "occurrence": True}]},  # accepted
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "mask": 3}]},  # TypeError
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "mask": "a\x00b.png"}]},  # ValueError
    {"prompt": PROMPT, "regions": [{"phrase": "a red dog", "box": [0, 0, 1, 1]}], 3: "x", "x": 3},  # TypeError
])
def test_found_layouts(data):
    with pytest.raises(UsageError):
        Layout.from_dict(data)


@pytest.mark.parametrize("content", [b"1" * 5000, b"[" * 5000])  # ValueError (digit limit), RecursionError
def test_found_layout_files(tmp_path, content):
    (tmp_path / "layout.json").write_bytes(content)
    with pytest.raises(UsageError, match="not valid JSON"):
        Layout.load(tmp_path / "layout.json")


def test_found_sketch_colour(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(UsageError, match="#rrggbb"):  # was an OverflowError: int("-1", 16) is a colour -1
        Layout.from_dict({"prompt": PROMPT, "sketch": "s.png",
                          "regions": [{"phrase": "a red dog", "color": "#-1-1-1"}]}, base=tmp_path)


def test_found_layout_constructor_cases():
    for kwargs in [dict(prompt="", regions=[Region("", box=(0, 0, 1, 1))]), dict(prompt=PROMPT, regions=[]),
                   dict(prompt=5, regions=[Region("dog", box=(0, 0, 1, 1))]), dict(prompt=PROMPT, regions=["dog"]),
                   dict(prompt=PROMPT, regions=[Region("dog", box=(0, 0, 1))])]:
        with pytest.raises(UsageError):
            Layout(**kwargs)


@pytest.mark.parametrize("make", [
    lambda: RegulationConfig(iterations=2**1100),  # OverflowError in check
    lambda: RegulationConfig(gamma=[1.0]),  # accepted
    lambda: RegulationConfig(sigma=(1, 2)),  # TypeError
    lambda: RegulationConfig(implementation=np.array(["fast", "direct"])),  # ValueError (ambiguous truth value)
    lambda: RegulationConfig(targets=[""]),  # accepted
    lambda: RegulationConfig(targets=5),  # TypeError
    lambda: RegulationConfig(layers=[5]),  # accepted
    lambda: RegulationConfig(edit_steps=[1.5]),  # accepted as step 1
    lambda: RegulationConfig(edit_steps=["a"]),  # ValueError
    lambda: ASTConfig(schedule=[{"from": 0, "to": 1, "blocks": [5]}]),  # AttributeError
    lambda: ASTConfig(schedule=[{"from": 0, "to": 1, "blocks": ["i2i"], "role": ["instance"]}]),  # accepted
    lambda: ASTConfig(schedule='[{"from": 1e999, "to": 1, "blocks": ["i2i"]}]'),  # ValueError: Fraction("inf")
    lambda: CaptureConfig(words=5),  # TypeError
    lambda: CaptureConfig(words=["cat"], steps=5),  # accepted, then a TypeError in Capture
    lambda: Capture(["cat"], requested="no"),  # accepted
    lambda: Hierarchy(LAYOUT, role_parser="nope"),  # accepted
    lambda: Hierarchy(LAYOUT, steps=5),  # TypeError
    lambda: TargetCoverage(5),  # TypeError
    lambda: TargetCoverage(["cat"], quantile=2),  # accepted
    lambda: TargetCoverage(["cat"], sites=["down_blocks.2"]),  # accepted, then a TypeError in wants()
    lambda: models.load_pipeline(None),  # AttributeError
    lambda: models.load_pipeline("random:sd3?layers=²"),  # ValueError
    lambda: models.load_pipeline("random:sd15-tiny", seed=2**70),  # ValueError from torch.manual_seed
])
def test_found_constructor_cases(make):
    with pytest.raises(UsageError):
        make()


def test_found_long_schedule_text():
    bands = [{"from": i / 5, "to": (i + 1) / 5, "blocks": ["i2i", "t2t", "i2t"], "roles": ["instance"]}
             for i in range(5)]
    assert len(ASTConfig(schedule=json.dumps(bands)).schedule) == 5  # was "File name too long"

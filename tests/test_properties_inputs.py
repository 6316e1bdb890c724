"""Property-based tests (Hypothesis) of what a person types or drops in a folder (issue 33, item 8), beside
test_properties.py (layouts, constructors and configs):

- every value-taking flag of `attnctl generate`, `maps`, `analyze`, `eval` and `tune`, given any text as
  `--flag=value`: refused with exit status 2 and an `attnctl...: error:` line (no traceback, no internal error), or
  accepted — and then the value is within the flag's documented bounds. Nothing is generated: the model loaders are
  replaced by a stand-in that stops the command where the model would load, after every cheap check;
- a model folder's `attnctl.json` (any bytes, any JSON, well-formed objects with any values) and `model_index.json`:
  accepted, with every setting inside its flag's bounds, or a UsageError naming the file;
- the non-finite-image check: NaN or infinity anywhere is BrokenImage (exit status 3, nothing written), finite images
  become PIL images of the same size.

What the properties found (and what was fixed for it) is kept at the end as examples."""

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attnctl import models
from attnctl.cli import build_parser, main
from attnctl.config import build, cli_fields, default_of, flag_of
from attnctl.errors import BrokenImage, UsageError
from attnctl.methods.capture import CaptureConfig
from attnctl.methods.registry import METHODS, layout_methods

from conftest import tiny_pipe

LAYOUT = Path(__file__).resolve().parent.parent / "examples" / "two_animals.json"
SD15, SD3 = "random:sd15-tiny", "random:sd3-tiny"


def props(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# --- running the command line up to the point where a model would load -------------------------------------------

LOADING = "loading"  # the status `attnctl` returns here when it got as far as loading a model


class _Loading(BaseException):
    """Raised by the stand-in loaders. A BaseException, so that neither the CLI's catch-all for bugs (`except
    Exception`) nor the loader's own error wrapping turns it into an exit status."""


def _stand_in(*args, **kwargs):
    raise _Loading(args, kwargs)


@contextlib.contextmanager
def stopped_before_loading():
    """Every model spec that reaches `models.load_pipeline` stops there after its checks: random: specs at their
    builders, built-in models, folders and hub ids at diffusers' `DiffusionPipeline.from_pretrained` (after
    attnctl's own folder checks), whichever module calls the loader and under whatever name."""
    from diffusers import DiffusionPipeline

    with mock.patch.dict(models._RANDOM_BUILDERS, dict.fromkeys(models._RANDOM_BUILDERS, _stand_in)), \
            mock.patch.object(DiffusionPipeline, "from_pretrained", _stand_in):
        yield


def attnctl(folder: Path, *argv) -> tuple:
    """`attnctl ARGV` run in-process in `folder` (relative paths land there): (status or LOADING, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with stopped_before_loading(), contextlib.chdir(folder), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except _Loading:
            code = LOADING
    return code, out.getvalue(), err.getvalue()


ERROR_LINE = re.compile(r"^attnctl(?: [a-z]+)?: error: ", re.MULTILINE)  # ours, or argparse's "attnctl CMD: error:"


def assert_refused(code, out, err, flag: str | None = None) -> None:
    """Exit status 2 and an error line (naming `flag` where given), not a traceback or an internal error."""
    assert code == 2, (code, err)
    assert ERROR_LINE.search(err), err
    assert "Traceback" not in out + err and "internal error" not in err, err
    if flag is not None:
        assert flag in err, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


# --- the flags ------------------------------------------------------------------------------------------------------

def _subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def value_flags(command: str) -> list[str]:
    """The flags of `command` that take a value (not --help, not on/off switches)."""
    return [a.option_strings[0] for a in _subparsers()[command]._actions
            if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


# paths: test_properties and the examples below
PATH_FLAGS = {"--model", "--out", "--layout", "--unet-model", "--mmdit-model"}
OWNER = {}  # a method's flag -> the first method that declares it (--targets is shared)
for _name, _entry in METHODS.items():
    for _field in cli_fields(_entry.config):
        OWNER.setdefault(flag_of(_entry.config, _field.name), _name)


def generate_base(method: str) -> list[str]:
    if method in layout_methods():
        return ["generate", "--method", method, "--model", SD3, "--layout", LAYOUT]
    return ["generate", "--method", method, "--model", SD15, "--prompt", "a red cat and a blue dog"]


def base_command(command: str, flag: str) -> list[str]:
    """A command line that reaches the model's loading as it is, for trying `flag` on (without --out)."""
    if command == "generate":
        return generate_base(OWNER.get(flag, "regulation"))
    return {"maps": ["maps", "--model", SD15, "--prompt", "a cat and a dog", "--words", "cat"],
            "analyze": ["analyze", "--model", SD3, "--layout", LAYOUT, "--with-ast"],
            "eval": ["eval", "--quick"],
            "tune": ["tune", "--method", "regulation"]}[command]


COMMANDS = ("generate", "maps", "analyze", "eval", "tune")
FLAGS = {command: [f for f in value_flags(command) if f not in PATH_FLAGS] for command in COMMANDS}

# the documented bounds of the numeric sampling flags, the same on every command: kind, lowest, highest
BOUNDS = {"--seed": (int, 0, 2**64 - 1), "--steps": (int, 1, 1000), "--height": (int, 8, 4096),
          "--width": (int, 8, 4096), "--num-images": (int, 1, 64), "--max-sequence-length": (int, 1, 512),
          "--seed-grid": (int, 0, 64), "--prompts": (int, 1, 20), "--seeds": (int, 1, 1000)}
GUIDANCE_ALWAYS_ACCEPTED = 100.0  # --guidance: finite and >= 0 when accepted, and up to this always accepted
DTYPE_NAMES = {"float32", "float16", "bfloat16", "fp32", "fp16", "bf16"}
SAMPLING_FLAGS = [*BOUNDS, "--guidance", "--dtype", "--device"]
USABLE_DEVICE_TYPES = {"cpu", "cuda", "mps"}


def _config_fields():
    """flag -> (config class, field, the options the command's base line gives that config) for the configs behind
    the flags: the methods', Capture's and, once it exists, the sampling config's."""
    configs = [(m.config, {}) for m in METHODS.values()] + [(CaptureConfig, {"words": ["cat"]})]
    try:
        from attnctl.sampling import SamplingConfig
        configs.append((SamplingConfig, {}))
    except ImportError:
        pass
    fields = {}
    for config, base in configs:
        for f in cli_fields(config):
            fields.setdefault(flag_of(config, f.name), (config, f, base))
    return fields


CONFIG_FIELDS = _config_fields()


def parse_of(field):
    """What the flag of a config field does to its text (None for a field whose flag is an on/off switch)."""
    default = default_of(field)
    return None if isinstance(default, bool) else field.metadata.get("parse") or (
        type(default) if default is not None else None)


# --- values ---------------------------------------------------------------------------------------------------------

WEIRD = st.sampled_from([
    "", " ", "-", "--", "-1", "+1", "0", "1", "2", "7", " 7 ", "7\n", "1.0", "1.5", "-0.5", "1e3", "1e308", "1e999",
    "-1e999", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "0x10", "0b1", "1_000", "١٢", "²", "½", "\x00", "é",
    "猫", "a,b", ",", ",,", "cat", "dog", "cat,dog", "cat#2", "red cat", "red cat,blue dog", "0:0.5", "0:x", "5:1.5",
    "0:0.1,10:0.5", "0-9", "3-1", "0,5,10", "[]", "{}", "[1]", "null", "true", "false", "9" * 5000, "\t", "\ud800",
    "weight=10,25", "strength=1", "=", "x=", "fast", "exact", "rules", "float16", "bf16", "float8", "cpu", "cuda",
    "cuda:0", "cuda:-1", "mps", "meta", "gpu", "CPU", "cpu:0", "none", "regulation", "ast",
])
NUMBERS = st.one_of(
    st.integers(-3, 70), st.sampled_from([512, 513, 1000, 1001, 4095, 4096, 4097, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 150),
).map(str)
VALUES = st.one_of(WEIRD, NUMBERS, st.text(max_size=10), st.tuples(WEIRD, NUMBERS).map("".join),
                   st.tuples(NUMBERS, st.sampled_from([",", ":", "-", "e", " "]), NUMBERS).map("".join))


def check_accepted(flag: str, text: str) -> None:
    """What an accepted `--flag=text` must be: inside the flag's bounds, a value its config takes, a usable device."""
    if flag in BOUNDS:
        kind, low, high = BOUNDS[flag]
        value = kind(text)  # argparse took it: so does int()
        assert low <= value <= high, (flag, text)
    elif flag == "--guidance":
        value = float(text)
        assert math.isfinite(value) and value >= 0, text
    elif flag == "--dtype":
        assert text in DTYPE_NAMES, text
    elif flag == "--device":
        assert torch.device(text).type != "meta", text
        torch.zeros(1, device=text)  # a device this machine has
    if flag in CONFIG_FIELDS:  # the flag's config takes the parsed value on its own
        config, field, base = CONFIG_FIELDS[flag]
        parse = parse_of(field)
        if parse is not None:
            build(config, None, **{**base, field.name: parse(text)})


def must_accept(flag: str, text: str) -> bool:
    """Whether `--flag=text` is plainly fine (a whole number inside the bounds, ...), so that refusing it is a bug."""
    try:
        if flag in BOUNDS:
            kind, low, high = BOUNDS[flag]
            return low <= kind(text) <= high
        if flag == "--guidance":
            return 0 <= float(text) <= GUIDANCE_ALWAYS_ACCEPTED
    except ValueError:
        return False
    return (flag == "--dtype" and text in ("float32", "float16", "bfloat16")) or (flag == "--device" and text == "cpu")


def try_flag(folder: Path, command: str, flag: str, text: str) -> None:
    out_dir = folder / "out"
    code, out, err = attnctl(folder, *base_command(command, flag), f"{flag}={text}", "--out", out_dir)
    assert not out_dir.exists(), "something was written before the model loaded"
    if code == LOADING:
        check_accepted(flag, text)
        return
    numeric = flag in BOUNDS or flag == "--guidance" or (
        flag in CONFIG_FIELDS and parse_of(CONFIG_FIELDS[flag][1]) in (int, float))
    assert_refused(code, out, err, flag if numeric else None)
    assert not must_accept(flag, text), (command, flag, text, err)


def test_the_stand_in_stops_every_base_command_at_loading(folder):
    """Each base command line reaches the loader untouched (so a refusal below is the flag's), and the stand-in
    stops it there: no image is generated and nothing is written."""
    for command in COMMANDS:
        for base in {tuple(map(str, base_command(command, flag))) for flag in FLAGS[command]}:
            code, out, err = attnctl(folder, *base, "--out", folder / "out")
            assert code == LOADING, (base, code, err)
            assert not (folder / "out").exists()
    assert {"--seed", "--steps", "--guidance", "--height", "--width", "--num-images", "--max-sequence-length",
            "--dtype", "--device", "--seed-grid", "--strength", "--ast-strength", "--ae-scale-factor",
            "--ae-thresholds", "--bind-groups", "--targets", "--prompt"} <= set(FLAGS["generate"])
    assert {"--steps", "--guidance", "--device", "--strengths", "--categories", "--methods"} <= set(FLAGS["eval"])


SAMPLING_CASES = [(c, f) for c in COMMANDS for f in FLAGS[c] if f in SAMPLING_FLAGS]
OTHER_CASES = [(c, f) for c in COMMANDS for f in FLAGS[c] if f not in SAMPLING_FLAGS]


@props(160)
@given(case=st.sampled_from(SAMPLING_CASES), text=st.one_of(VALUES, NUMBERS))
def test_any_sampling_flag_value_is_refused_with_status_2_or_within_its_bounds(folder, case, text):
    try_flag(folder, *case, text)


@props(200)
@given(case=st.sampled_from(OTHER_CASES), text=VALUES)
def test_any_method_or_command_flag_value_is_refused_with_status_2_or_taken_by_its_config(folder, case, text):
    try_flag(folder, *case, text)


# --- a model folder's attnctl.json ----------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400])
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2, 5000), HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 5000),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 64.0, 1e-320, 1e308, float("nan"), float("inf"), -float("inf")]),
    st.text(max_size=8), st.sampled_from(["", "25", "cat", "cat,dog", "0-9", "fast", "exact", "\ud800"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
SETTING_FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "height": "--height",
                 "width": "--width", "max_sequence_length": "--max-sequence-length"}
OPTION_NAMES = sorted({f.name for m in METHODS.values() for f in cli_fields(m.config)})
KNOWN_BAD_OPTION_NAMES = {"config", "config_class"}  # known bug: see test_found_settings_files


@st.composite
def method_options(draw):
    names = st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=6))
    return draw(st.dictionaries(names, JSON_VALUES, max_size=3))


@st.composite
def settings_objects(draw):
    """A JSON object with the known keys (and now and then an unknown one), each with any value."""
    keys = st.one_of(st.sampled_from([*SETTING_FLAGS, "methods"]), st.text(max_size=6))
    settings_ = draw(st.dictionaries(keys, JSON_VALUES, max_size=4))
    if draw(st.booleans()):
        method_names = st.one_of(st.sampled_from(list(METHODS)), st.text(max_size=6))
        settings_["methods"] = draw(st.dictionaries(method_names, st.one_of(method_options(), JSON_VALUES),
                                                    max_size=3))
    return settings_


def _json_bytes(value) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")  # NaN and Infinity as JavaScript writes them


def _written_json(value) -> bool:
    """Whether a drawn value avoids the known bugs (test_found_settings_files, and
    test_found_attnctl_json_settings_the_pipeline_cannot_take): option names that clash with `build`'s own
    parameters, null sampling settings."""
    if not isinstance(value, dict):
        return True
    methods = value.get("methods")
    return not (isinstance(methods, dict) and any(isinstance(o, dict) and KNOWN_BAD_OPTION_NAMES & set(o)
                                                  for o in methods.values())) and \
        not any(value.get(key, 0) is None for key in SETTING_FLAGS)


def read_settings(folder: Path, content: bytes):
    """sampling_defaults and every method's recommended_options of a folder holding `content` as attnctl.json:
    (defaults, {method: options}), or the UsageError both raise alike."""
    (folder / "attnctl.json").write_bytes(content)
    spec = str(folder)
    try:
        defaults = models.sampling_defaults(spec)
    except UsageError as err:
        assert "attnctl.json" in str(err), err
        for name in METHODS:  # the same file, the same answer
            with pytest.raises(UsageError, match="attnctl.json"):
                models.recommended_options(spec, name)
        return err
    return defaults, {name: models.recommended_options(spec, name) for name in METHODS}


def check_settings(content: bytes, answer) -> None:
    if isinstance(answer, UsageError):
        return
    defaults, recommended = answer
    written = json.loads(content.decode("utf-8"))  # accepted: then it is a JSON object...
    assert isinstance(written, dict)
    assert defaults == {k: v for k, v in written.items() if k != "methods"}  # ...used as written
    for key, value in defaults.items():  # every setting passes the bounds of its flag
        flag = SETTING_FLAGS[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value >= 0, (key, value)
        if flag in BOUNDS:
            kind, low, high = BOUNDS[flag]
            assert float(value).is_integer() and low <= value <= high, (key, value)  # 2.0 is read as 2
    try:
        from attnctl.sampling import FOLDER_SETTINGS, SamplingConfig
    except ImportError:
        pass
    else:  # and the sampling config takes them all
        SamplingConfig(**{FOLDER_SETTINGS[k]: v for k, v in defaults.items()})
    for name, options in recommended.items():
        assert options == written.get("methods", {}).get(name, {})
        build(METHODS[name].config, None, **options)  # every recommended option passes its config's checks


@props(150)
@given(content=st.one_of(st.binary(max_size=40), JSON_VALUES.filter(_written_json).map(_json_bytes),
                         st.sampled_from([b"", b"{", b"\xef\xbb\xbf{}", "{}".encode("utf-16"), b"{}\x00", b"null",
                                          b'{"methods": null}', b'{"height": 1e999}', b"[" * 50 + b"]" * 50])))
def test_any_bytes_or_json_as_attnctl_json_is_taken_or_a_usage_error_naming_it(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("model")
    check_settings(content, read_settings(folder, content))


@props(200)
@given(written=settings_objects().filter(_written_json))
def test_any_values_of_the_known_settings_are_taken_within_their_flags_bounds_or_refused(tmp_path_factory, written):
    folder = tmp_path_factory.mktemp("model")
    content = _json_bytes(written)
    check_settings(content, read_settings(folder, content))


# --- a pipeline folder's model_index.json ---------------------------------------------------------------------------

CLASS_NAMES = st.one_of(
    st.sampled_from(["StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline", "DiffusionPipeline",
                     "UNet2DConditionModel", "AutoencoderKL", "FlaxStableDiffusionPipeline", "NoSuchPipeline",
                     "__class__", "__init__", "_LazyModule", "utils", "", " ", "1x", "StableDiffusionPipeline ",
                     "stablediffusionpipeline", "\x00"]),
    st.text(max_size=10), JSON_SCALARS)


@st.composite
def model_indexes(draw):
    index = draw(st.dictionaries(st.text(max_size=6), st.one_of(
        JSON_VALUES, st.sampled_from([[None, None], ["diffusers", "UNet2DConditionModel"], [None]])), max_size=3))
    if draw(st.integers(0, 9)):
        index["_class_name"] = draw(CLASS_NAMES)
    return index


@props(150)
@given(content=st.one_of(st.binary(max_size=30), JSON_VALUES.map(_json_bytes), model_indexes().map(_json_bytes)))
def test_any_model_index_json_loads_or_is_a_usage_error_naming_it(tmp_path_factory, content):
    import diffusers

    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "model_index.json").write_bytes(content)
    try:
        with stopped_before_loading():
            models.load_pipeline(str(folder))
    except UsageError as err:
        assert "model_index.json" in str(err), err
        return
    except _Loading as loading:
        _, kwargs = loading.args
        index = json.loads(content.decode("utf-8"))
        cls = getattr(diffusers, index["_class_name"])
        assert isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)
        assert kwargs == {k: None for k, v in index.items() if v == [None, None]}  # components saved as None
        return
    pytest.fail("load_pipeline returned without loading")


# --- non-finite images ----------------------------------------------------------------------------------------------

def _finite_images():
    """The check between the pipeline's float images and anything written (it moves with the code: found by name)."""
    for where in ("attnctl.run", "attnctl.cli.common", "attnctl.outputs"):
        try:
            function = getattr(importlib.import_module(where), "finite_images", None)
        except ImportError:
            continue
        if function is not None:
            required = [p for p in inspect.signature(function).parameters.values() if p.default is p.empty]
            return function if len(required) == 1 else lambda arrays, f=function: f(arrays, None)
    raise AssertionError("no finite_images found: where are non-finite images refused now?")


finite_images = _finite_images()


@st.composite
def image_batches(draw):
    """Float images as a pipeline returns them with output_type="np": (n, height, width, channels) in [0, 1]."""
    n, channels = draw(st.integers(1, 4)), draw(st.sampled_from([3, 3, 1]))
    low = 2 if channels == 1 else 1  # one channel and one row: diffusers' numpy_to_pil squeezes the row away
    height, width = draw(st.integers(low, 9)), draw(st.integers(low, 9))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    seed = draw(st.integers(0, 2**32 - 1))
    arrays = np.random.default_rng(seed).random((n, height, width, channels)).astype(dtype)
    arrays[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.0, 1.0, 0.5]))  # a flat image is an image
    return arrays


@props(150)
@given(arrays=image_batches())
def test_finite_images_become_pil_images_of_the_same_size(arrays):
    images = finite_images(arrays)
    n, height, width, channels = arrays.shape
    assert len(images) == n
    for image, array in zip(images, arrays):
        assert isinstance(image, Image.Image) and image.size == (width, height)
        assert image.mode == ("RGB" if channels == 3 else "L")
        pixels = np.asarray(image, dtype=np.float64).reshape(array.shape)
        assert np.abs(pixels - array.astype(np.float64) * 255).max() <= 1


@props(200)
@given(arrays=image_batches(), data=st.data())
def test_a_nan_or_infinity_anywhere_is_a_broken_image(arrays, data):
    flat = arrays.reshape(-1)
    spots = data.draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=4, unique=True))
    for spot in spots:
        flat[spot] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    bad = sorted({spot // (flat.size // len(arrays)) for spot in spots})
    with pytest.raises(BrokenImage) as caught:
        finite_images(arrays)
    assert isinstance(caught.value, UsageError)
    assert f"image(s) {bad}" in str(caught.value) and "nothing was written" in str(caught.value)


@props(3)
@given(n=st.integers(1, 3), data=st.data())
def test_the_command_line_exits_3_and_writes_nothing_for_a_non_finite_image(tmp_path_factory, n, data):
    """The whole path: a tiny pipeline whose decoder puts NaN into some of the images (none: exit 0, n files)."""
    bad = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    rows = {i: data.draw(st.integers(0, 63)) for i in bad}  # a row of the 64x64 image made NaN
    pipe = tiny_pipe("unet")
    decode = pipe.vae.decode

    def broken_decode(latents, *args, **kwargs):
        output = decode(latents, *args, **kwargs)
        sample = (output[0] if isinstance(output, tuple) else output.sample).clone()
        for i, row in rows.items():
            sample[i, :, row, :] = float("nan")
        return (sample,) if isinstance(output, tuple) else type(output)(sample=sample)

    folder = tmp_path_factory.mktemp("broken")
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(models._RANDOM_BUILDERS, {"sd15": lambda tiny, **options: pipe}), \
            mock.patch.object(pipe.vae, "decode", broken_decode), contextlib.chdir(folder), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", "--method", "none", "--model", SD15, "--prompt", "a cat", "--steps", "1",
                     "--height", "64", "--width", "64", "--num-images", str(n), "--out", str(folder / "out")])
    if bad:
        assert code == 3 and f"image(s) {sorted(bad)}" in err.getvalue(), (code, err.getvalue())
        assert "Traceback" not in err.getvalue() and not (folder / "out").exists()
    else:
        assert code == 0, err.getvalue()
        assert len(list((folder / "out").glob("*.png"))) == n


# --- what the properties found (each fixed; kept as examples) ---------------------------------------------------

@pytest.mark.parametrize("device", ["xla", "hpu", "mkldnn", "lazy"])
def test_found_unusable_devices(folder, device):
    code, out, err = attnctl(folder, *generate_base("regulation"), f"--device={device}", "--out", folder / "out")
    assert_refused(code, out, err, "--device")


@pytest.mark.parametrize("argv", [
    [*generate_base("regulation"), "--dtype=--"], [*generate_base("regulation"), "--method=--"],
    ["eval", "--quick", "--prompts=--"], ["eval", "--quick", "--methods=--"], ["tune", "--method", "regulation",
                                                                              "--set=--"],
], ids=["generate-dtype", "generate-method", "eval-prompts", "eval-methods", "tune-set"])
def test_found_double_dash_values(folder, argv):
    code, out, err = attnctl(folder, *argv, "--out", folder / "out")
    assert_refused(code, out, err)


LONG_NAME = "x" * 300  # longer than a file name may be: OSError ENAMETOOLONG, which Path.exists() does not swallow


@pytest.mark.parametrize("argv", [
    [*generate_base("regulation"), "--model=~attnctl-no-such-user"],
    ["generate", "--method", "none", "--prompt", "a cat", "--model=~attnctl-no-such-user/model"],
    ["tune", "--method", "regulation", "--model=~attnctl-no-such-user"],
    [*generate_base("regulation"), f"--model={LONG_NAME}"],
    ["generate", "--method", "none", "--prompt", "a cat", f"--model={LONG_NAME}"],
], ids=["home-regulation", "home-none", "home-tune", "long-regulation", "long-none"])
def test_found_model_specs_that_are_not_paths(folder, argv):
    code, out, err = attnctl(folder, *argv, "--out", folder / "out")
    assert code in (2, LOADING) and "internal error" not in err and "Traceback" not in err, (code, err)


@pytest.mark.parametrize("command", ["generate", "eval", "tune"])
def test_found_long_out_names(folder, command):
    code, out, err = attnctl(folder, *base_command(command, "--seed"), "--out", LONG_NAME)
    assert_refused(code, out, err, "--out")


@pytest.mark.parametrize("content", [b"1" * 5000, b"[" * 5000, b'{"methods": {"regulation": {"config": 1}}}',
                                     b'{"methods": {"ast": {"config_class": 1}}}'],
                         ids=["digits", "nesting", "config", "config_class"])
def test_found_settings_files(tmp_path, content):
    (tmp_path / "attnctl.json").write_bytes(content)
    with pytest.raises(UsageError, match="attnctl.json"):
        models.sampling_defaults(str(tmp_path))


@pytest.mark.parametrize("content", [b"1" * 5000, b"[" * 5000], ids=["digits", "nesting"])
def test_found_model_indexes(tmp_path, content):
    (tmp_path / "model_index.json").write_bytes(content)
    with pytest.raises(UsageError, match="model_index.json"):
        models.load_pipeline(str(tmp_path))


@pytest.mark.parametrize("content, extra", [('{"num_inference_steps": 2.0}', []),
                                            ('{"num_inference_steps": null}', []),
                                            ('{"guidance_scale": null}', ["--steps", "1"])],
                         ids=["whole-float-steps", "null-steps", "null-guidance"])
def test_found_attnctl_json_settings_the_pipeline_cannot_take(tmp_path, content, extra):
    from diffusers import DiffusionPipeline

    pipe = tiny_pipe("unet")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "attnctl.json").write_text(content)
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(DiffusionPipeline, "from_pretrained", lambda *a, **k: pipe), contextlib.chdir(tmp_path), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", "--method", "none", "--model", str(tmp_path), "--prompt", "a cat", "--height", "64",
                     "--width", "64", *extra, "--out", str(tmp_path / "out")])
    assert code in (0, 2) and "internal error" not in err.getvalue(), (code, err.getvalue())
    if code == 2:
        assert "attnctl.json" in err.getvalue()

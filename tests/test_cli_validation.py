"""Bad values of every option end before any model is loaded, with exit status 2 and a message naming the flag: a
table over the sampling options, and one generated from the method configs' fields (every numeric field gets NaN,
infinity, text and values past its bounds)."""

import dataclasses
from pathlib import Path

import pytest

from attnctl.config import cli_fields, default_of, flag_of
from attnctl.methods.ast import ASTConfig
from attnctl.methods.registry import METHODS, layout_methods, listing
from attnctl.methods.regulation import RegulationConfig

LAYOUT = Path(__file__).resolve().parent.parent / "examples" / "two_animals.json"
BASE = {"regulation": ["generate", "--method", "regulation", "--model", "random:sd15-tiny", "--prompt",
                       "a cat and a dog"],
        "ast": ["generate", "--method", "ast", "--model", "random:sd3-tiny", "--layout", str(LAYOUT)],
        "attend-excite": ["generate", "--method", "attend-excite", "--model", "random:sd15-tiny", "--prompt",
                          "a cat and a dog"],
        "layout-modulation": ["generate", "--method", "layout-modulation", "--model", "random:sd3-tiny", "--layout",
                              str(LAYOUT)],
        "binding": ["generate", "--method", "binding", "--model", "random:sd15-tiny", "--prompt",
                    "a red cat and a blue dog"],
        "relocation": ["generate", "--method", "relocation", "--model", "random:sd15-tiny", "--layout", str(LAYOUT)],
        "noise-choice": ["generate", "--method", "noise-choice", "--model", "random:sd15-tiny", "--prompt",
                         "a cat and a dog"],
        "contrast-guidance": ["generate", "--method", "contrast-guidance", "--model", "random:sd15-tiny", "--prompt",
                              "a red cat and a blue dog"],
        "none": ["generate", "--method", "none", "--model", "random:sd15-tiny", "--prompt", "a cat"]}

SAMPLING = [
    ("--steps", "0", "--steps must be between 1 and 1000"), ("--steps", "100000000", "--steps must be between"),
    ("--steps", "two", "invalid int value"), ("--seed", "-1", "--seed must be between 0"),
    ("--seed", str(2**64), "--seed must be between 0"), ("--height", "-64", "--height must be between 8"),
    ("--height", "8192", "--height must be between 8 and 4096"), ("--width", "0", "--width must be between"),
    ("--num-images", "0", "--num-images must be between 1"), ("--num-images", "1000", "--num-images must be"),
    ("--guidance", "nan", "--guidance must be a finite number"), ("--guidance", "inf", "--guidance must be a finite"),
    ("--guidance", "-2", "--guidance must be between 0 and 100"), ("--guidance", "1e308", "between 0 and 100"),
    ("--max-sequence-length", "0", "between 1"),
    ("--device", "nonsense", "--device 'nonsense' is not a device"), ("--dtype", "float8", "unknown dtype"),
]


@pytest.mark.parametrize("flag, value, message", SAMPLING)
def test_sampling_options(flag, value, message, cli, tmp_path):
    code, out, err = cli(*BASE["none"], "--out", tmp_path, flag, value)
    assert code == 2 and message in err, err
    assert "Traceback" not in out + err and not list(tmp_path.iterdir())  # nothing generated or written


def test_cuda_without_cuda_and_out_that_is_a_file(cli, tmp_path):
    import torch

    if not torch.cuda.is_available():
        code, _, err = cli(*BASE["none"], "--out", tmp_path, "--device", "cuda")
        assert code == 2 and "no CUDA device" in err
        code, _, err = cli("eval", "--quick", "--device", "cuda", "--out", tmp_path / "eval")
        assert code == 2 and "no CUDA device" in err  # was an internal error from inside torch
    existing = tmp_path / "file.png"
    existing.write_bytes(b"")
    code, _, err = cli(*BASE["none"], "--out", existing)
    assert code == 2 and "must be a folder" in err


def _bad_values(field):
    meta, default = field.metadata, default_of(field)
    kind = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else meta.get("parse")
    if kind not in (int, float):
        return []
    bad = [("abc", f"invalid {kind.__name__} value")]
    if kind is float:
        bad += [("nan", "must be a finite number"), ("inf", "must be a finite number")]
    else:
        bad += [("1.5", "invalid int value")]
    if meta.get("low") is not None:
        bad.append((str(meta["low"] - 1), "must be"))
    if meta.get("high") is not None:
        bad.append((str(meta["high"] + 1 if kind is int else meta["high"] * 2 + 1), "must be"))
    return bad


CASES = [(name, flag_of(m.config, f.name), value, message)
         for name, m in METHODS.items() for f in cli_fields(m.config) for value, message in _bad_values(f)]


def test_the_table_covers_every_numeric_option():
    numeric = {f.name for c in (RegulationConfig, ASTConfig) for f in dataclasses.fields(c) if _bad_values(f)}
    assert {"iterations", "step_size", "sigma", "decay", "strength", "seed", "w_i2t", "tuned_steps", "a_txt"} <= numeric
    assert len(CASES) >= 60 and set(BASE) == {*METHODS, "none"}


@pytest.mark.parametrize("method, flag, value, message", CASES)
def test_method_options(method, flag, value, message, cli, tmp_path):
    code, out, err = cli(*BASE[method], "--out", tmp_path, f"{flag}={value}")
    assert code == 2 and message in err and (flag in err or "argument" in err), err
    assert "Traceback" not in out + err and not list(tmp_path.iterdir())


def _bad_files(tmp_path):
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    (tmp_path / "sketch5.json").write_text('{"prompt": "a cat", "sketch": 5, "regions": [{"phrase": "a cat", '
                                           '"color": [1, 2, 3]}]}')
    return tmp_path


OTHER = [
    (["sites", "--model", "random:sd15-tiny?layers=4"], "takes no options, not 'layers'"),
    (["sites", "--model", "random:flux-tiny?double=x"], "must be a whole number from 1 to 64"),
    (["sites", "--model", "random:sd15-tiny", "--height", "-64"], "--height must be between 8"),
    (["generate", "--method", "ast", "--model", "random:sd3-tiny", "--layout", "{tmp}"], "is a folder"),
    (["generate", "--method", "ast", "--model", "random:sd3-tiny", "--layout", "{tmp}/binary.json"], "not valid JSON"),
    (["generate", "--method", "ast", "--model", "random:sd3-tiny", "--layout", "{tmp}/sketch5.json"],
     "'sketch' must be the path of a PNG"),
    (BASE["ast"] + ["--ast-schedule", "5"], "the AST schedule is a list of bands"),
    (BASE["ast"] + ["--ast-tuned-steps", "50", "--steps", "2"],
     "(--ast-tuned-steps) is 50, more than this run's 2 denoising steps"),
    (["eval", "--steps", "0"], "--steps must be between 1"),
    (["eval", "--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["app", "--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["bench", "capture", "--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["eval", "--seeds", "0"], "--seeds must be between 1"),
    (["eval", "--prompts", "0"], "--prompts must be between 1"),
    (["eval", "--guidance", "nan"], "--guidance must be a finite number"),
    (["eval", "--guidance", "1e308"], "--guidance must be between 0 and 100"),
    (["tune", "--method", "ast", "--steps", "0"], "--steps must be between 1 and 1000"),
    (["eval", "--dose", "ast", "--strengths", "-1"], "give one or more strengths >= 0"),
    (["eval", "--categories", "everything"], "--categories 'everything': choose from single_objects, seen_pairs"),
    (["eval", "--targets", "cat"], "--targets does not apply to eval"),
    (["eval", "--ast-w-i2t", "nan"], "w_i2t (--ast-w-i2t) must be a finite number"),
    (["eval", "--methods", "none,attend-excite", "--targets", "cat"], "--targets does not apply to eval"),
    (BASE["attend-excite"] + ["--ae-thresholds", "0:x"], "write step:threshold pairs such as 0:0.05"),
    (BASE["attend-excite"] + ["--ae-thresholds", "0:1.5"], "thresholds (--ae-thresholds) must map step indices"),
    (BASE["attend-excite"] + ["--ast-w-i2t", "2"], "--ast-w-i2t belong to --method ast, not --method attend-excite"),
    (BASE["regulation"] + ["--ae-scale-factor", "2"], "--ae-scale-factor belong to --method attend-excite"),
    (["generate", "--method", "layout-modulation", "--model", "random:sd3-tiny", "--prompt", "a cat"],
     "--prompt does not apply to --method layout-modulation"),
    (["generate", "--method", "layout-modulation", "--model", "random:sd3-tiny"],
     "--method layout-modulation needs a layout"),
    (BASE["attend-excite"] + ["--layout", str(LAYOUT)],
     f"--layout applies to --method {listing(layout_methods())} only"),
    (BASE["binding"][:-1] + ["a cat and a dog"], "found no noun with a modifier in 'a cat and a dog'"),
    (BASE["binding"] + ["--targets", "cat,mouse"], "no modifier found for 'mouse'"),
    (BASE["binding"] + ["--bind-groups", "green cat"], "binding group 'green cat' is not a part of the prompt"),
    (BASE["binding"] + ["--bind-groups", "cat"], "two words or more"),
    (BASE["binding"] + ["--seed-grid", "-1"], "--seed-grid must be between 0 and 64"),
    (BASE["none"] + ["--seed-grid", "2"], "--seed-grid compares a method with the plain pipeline"),
    (BASE["none"] + ["--targets", "cat"], "--targets with --method none names the words of the maps: add --maps"),
    (BASE["binding"] + ["--bind-max-iter-to-alter", "9", "--steps", "2", "--height", "64", "--width", "64"],
     "max_iter_to_alter (--bind-max-iter-to-alter) is 9, more than this run's 2 denoising steps"),
    (BASE["regulation"] + ["--layers", "down_blocks.2", "--steps", "1", "--height", "64", "--width", "64"],
     "Regulation would edit nothing in this run: every chosen site is too small for its Gaussian basis"),
    (["sites", "--model", "random:flux-tiny", "--height", "60"], "--height 60 must be a multiple of 16 for this model"),
    (["eval", "--quick", "--methods="], "unknown method(s) ''"),
    (["app", "--host", "0.0.0.0", "--models", "builtin:nope"], "no built-in model 'builtin:nope'"),
    (["generate", "--steps", "1e9", "--prompt", "a cat"], "argument --steps: invalid int value: '1e9' (`attnctl "
                                                          "generate --help` lists the options)"),
    (["shapes", "train", "--family", "unet", "--threads", "-1"], "--threads must be between 1"),
    (["shapes", "train", "--family", "unet", "--steps", "0"], "--steps must be between 1"),
    (["shapes", "train", "--family", "mmdit", "--batch", "0"], "--batch must be between 1"),
]


@pytest.mark.parametrize("args, message", OTHER)
def test_other_bad_command_lines(args, message, cli, tmp_path):
    _bad_files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] in ("generate", "eval", "shapes") and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, out, err = cli(*args)
    assert code == 2 and message in err, err
    assert "Traceback" not in out + err and not (tmp_path / "out").exists()


TRAIN = ["shapes", "train", "--family", "unet", "--out", "o"]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "a cat", "--device", "meta", "--out", "o"], "--device meta holds no weights or images"),
    ([*TRAIN, "--device", "meta"], "--device meta holds no weights or images"),
    ([*TRAIN, "--device", "cuda"], "--device cuda: this torch build or machine has no CUDA"),
    ([*TRAIN, "--vae-minutes", "-1"], "--vae-minutes must be between 0.01 and"),
    ([*TRAIN, "--vae-minutes", "nan"], "--vae-minutes must be a finite number"),
    ([*TRAIN, "--seed", "-5"], "--seed must be between 0 and"),
])
def test_devices_and_training_flags_are_checked_the_same_way_on_every_command(argv, message, cli, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*argv)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("argv, message", [
    (["eval", "--methods", "none,none"], "names a method twice"),
    (["eval", "--dose", "regulation", "--strengths", "0,0,1"], "repeats a strength"),
    (["eval", "--out", "taken"], "--out 'taken' must be a folder"),
    (["eval", "--strengths", "0,1"], "--strengths are the strengths of --dose: add --dose METHOD"),
    (["eval", "--dose", "regulation", "--methods", "none,regulation"], "--methods does not apply: drop it"),
    (["eval", "--methods", "none,regulation", "--ast-strength", "0.5"],
     "--ast-strength: an option of ast, which this eval does not run (--methods none,regulation); add ast or drop it"),
    (["eval", "--dose", "regulation", "--ae-scale-factor", "5", "--ae-max-iter-to-alter", "3"],
     "--ae-max-iter-to-alter, --ae-scale-factor: options of attend-excite, which this eval does not run (--dose"),
])
def test_eval_refuses_duplicates_ignored_flags_and_a_file_as_out_before_any_work(argv, message, cli, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("mine")
    code, _, err = cli(*argv, "--quick")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert (tmp_path / "taken").read_text() == "mine" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, extra", [("attend-excite", ["--ae-scale-factor", "1e30"])])
def test_settings_that_break_the_image_exit_3_and_write_nothing(method, extra, cli, tmp_path):
    """Values inside every bound that still overflow: the image would be black; exit 3, no file."""
    code, out, err = cli(*BASE[method], "--steps", "2", "--height", "64", "--width", "64", *extra,
                         "--out", tmp_path / "o")
    assert code == 3 and "non-finite values" in err and "nothing was written" in err, err
    assert "Traceback" not in out + err and not (tmp_path / "o").exists()

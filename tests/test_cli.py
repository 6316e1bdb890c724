"""The command line: outputs written, bad input answered with a clear message and a non-zero exit, no traceback.
Run in-process through `attnctl.cli.main` (the `cli` fixture); one test runs the installed entry point."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

ENV = {**os.environ, "ATTNCTL_PROGRESS": "0"}


def test_entry_point_runs_as_a_program():
    res = subprocess.run([sys.executable, "-m", "attnctl.cli", "sites", "--model", "random:sd15-tiny"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "attention sites (unet)" in res.stdout
    res = subprocess.run([sys.executable, "-m", "attnctl.cli", "maps", "--model", "random:nothing", "--prompt", "a",
                          "--words", "a", "--out", "x"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and "unknown random model" in res.stderr and "Traceback" not in res.stderr


class Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def attnctl(cli):
    return lambda *args: Result(*cli(*args))


def test_maps_writes_image_plot_and_raw_probabilities(tmp_path, attnctl):
    res = attnctl("maps", "--model", "random:sd15-tiny", "--prompt", "a cat and a dog", "--words", "cat,dog",
                  "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert {"image.png", "maps.png", "maps.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1, modes  # every output with the same permissions
    with safe_open(str(tmp_path / "maps.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["words"]) == ["cat", "dog"]
        keys = list(f.keys())
        assert any(k.startswith("site/") for k in keys) and any(k.startswith("group/") for k in keys)
        for k in keys:
            t = f.get_tensor(k)
            assert t.shape[1] == 2 and float(t.min()) >= 0 and float(t.max()) <= 1


@pytest.mark.parametrize("args, message", [
    (["maps", "--model", "random:sd15-tiny", "--prompt", "a cat and a dog", "--words", "bird"],
     "'bird' is not in the prompt"),
    (["maps", "--model", "random:nothing", "--prompt", "a cat", "--words", "cat"], "unknown random model"),
    (["maps", "--model", "/no/such/folder-or-hub-id", "--prompt", "a cat", "--words", "cat"], "not available"),
    (["maps", "--model", "random:sd15-tiny", "--prompt", "a cat", "--words", "cat", "--height", "60"],
     "multiple of 8"),
    (["maps", "--model", "random:sd15-tiny", "--prompt", "a cat", "--words", "cat", "--dtype", "float8"],
     "unknown dtype"),
])
def test_bad_input_exits_cleanly(tmp_path, args, message, attnctl):
    res = attnctl(*args, "--out", str(tmp_path))
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_long_prompt_warns_what_was_cut(tmp_path, attnctl):
    prompt = "a cat " + "very " * 80 + "fluffy"
    res = attnctl("maps", "--model", "random:sd15-tiny", "--prompt", prompt, "--words", "cat", "--steps", "1",
                  "--height", "64", "--width", "64", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "cut" in res.stderr and "fluffy" in res.stderr


def test_sites_table(attnctl):
    res = attnctl("sites", "--model", "random:flux-tiny", "--height", "64", "--width", "64")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "4 attention sites (flux)" in lines[0]
    assert lines[2].split()[:4] == ["0", "transformer_blocks.0.attn", "joint", "double"]
    assert lines[-1].split()[:4] == ["3", "single_transformer_blocks.1.attn", "joint", "single"]
    assert lines[-1].split()[5] == "4x4"


def test_generate_without_a_method_maps_the_targets(tmp_path, attnctl):
    res = attnctl("generate", "--method", "none", "--model", "random:sd15-tiny", "--prompt", "a cat and a dog",
                  "--targets", "cat,dog", "--maps", "--steps", "1", "--height", "64", "--width", "64",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert {"image.png", "maps.png", "maps.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    with safe_open(str(tmp_path / "maps.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["words"]) == ["cat", "dog"]

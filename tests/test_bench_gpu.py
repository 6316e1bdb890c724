"""`attnctl bench gpu`: row and method selection, one JSON line per row as it finishes, errors kept in the rows, a
pristine plain baseline, and the default set's estimate; its dry run on the tiny models runs here."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnctl
from attnctl.bench import compare, gpu, plain

from conftest import tiny_pipe


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_chosen_rows_stream_one_json_line_each_with_their_methods_ratios(cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    code, out, err = cli("bench", "gpu", "--quick", "--device", "cpu", "--rows", "flux,sd15", "--methods",
                         "capture,ast", "--json", "--jsonl", path)
    assert code == 0, err
    lines = json_lines(out)
    assert lines[0]["environment"]["device"] == "cpu"
    rows = lines[1:]
    assert [r["row"] for r in rows] == ["flux", "sd15"]  # in the order named
    assert rows[0]["methods"] == ["capture", "ast"] and rows[1]["methods"] == ["capture"]  # sd15 takes no ast
    for r in rows:
        assert "error" not in r and r["dtype"] == "float32" and r["plain_s"] > 0
        for m in r["methods"]:
            assert r[f"{m}_time_ratio"] > 0 and r[f"{m}_peak_memory_ratio"] > 0 and f"{m}_error" not in r
    assert "regulation_time_ratio" not in rows[1]  # only the methods asked for
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert "bench gpu rows flux (capture, ast), sd15 (capture)" in out


def test_the_console_script_writes_each_row_before_the_next_finishes(tmp_path):
    """The installed `attnctl` in its own process: when a row's line reaches stdout, it is already in --jsonl, while
    the next row runs; killed then, the file keeps that row (what a timeout leaves)."""
    path = tmp_path / "rows.jsonl"
    script = Path(sys.executable).with_name("attnctl")
    proc = subprocess.Popen([str(script), "bench", "gpu", "--quick", "--device", "cpu", "--rows", "sd15,sd3",
                             "--methods", "capture", "--json", "--jsonl", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ATTNCTL_PROGRESS": "0"})
    try:
        for line in proc.stdout:
            if line.startswith("{") and "row" in json.loads(line):
                break
        else:
            pytest.fail(f"no row line; exit {proc.wait()}: {proc.stderr.read()}")
        first = json.loads(line)
        assert first["row"] == "sd15" and "error" not in first
        assert [json.loads(x) for x in path.read_text().splitlines()] == [first]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert [json.loads(x)["row"] for x in path.read_text().splitlines()][0] == "sd15"


class Boom(attnctl.Controller):
    observer = True

    def __call__(self, call):
        raise RuntimeError("boom")


def test_a_failing_method_or_row_is_recorded_and_the_rest_runs(monkeypatch):
    from attnctl import models

    monkeypatch.setitem(gpu.METHODS, "regulation", lambda pipe, prompt: [Boom()])
    real = models.load_pipeline

    def load(spec, **kwargs):
        if spec.startswith("random:flux"):
            raise RuntimeError("no room for the transformer")
        return real(spec, **kwargs)

    monkeypatch.setattr(models, "load_pipeline", load)
    seen = []
    results = gpu.run(quick=True, rows="flux,sd15", on_row=seen.append)
    flux, sd15 = seen
    assert flux["row"] == "flux" and flux["error"] == "RuntimeError: no room for the transformer"
    assert sd15["regulation_error"] == "RuntimeError: boom" and "regulation_time_ratio" not in sd15
    assert sd15["capture_time_ratio"] > 0 and "error" not in sd15
    table = gpu.table(results)
    assert "error: RuntimeError: no room" in table and "regulation error: RuntimeError: boom" in table


def test_the_plain_baseline_has_nothing_of_attnctl_attached():
    """During every plain run the UNet has no diffusers hook and its own processors; during the capture runs the
    step hook and attnctl's processors are there (so the check sees them)."""
    pipe = tiny_pipe("unet")
    own = dict(pipe.unet.attn_processors)
    running, seen = [], []

    def variant(name, controllers):
        def make(pipe, prompt):
            running.append(name)
            return controllers()
        return make

    def look(module, args):
        registry = getattr(module, "_diffusers_hook", None)
        seen.append((running[-1], bool(registry is not None and registry.hooks), dict(module.attn_processors) == own))

    handle = pipe.unet.register_forward_pre_hook(look)
    try:
        compare(pipe, {"plain": variant("plain", lambda: plain(None, None)),
                       "capture": variant("capture", lambda: [attnctl.Capture(["cat"])])},
                "a cat", dict(height=64, width=64, num_inference_steps=2, output_type="latent"), repeats=1)
    finally:
        handle.remove()
    assert {s for s in seen if s[0] == "plain"} == {("plain", False, True)}
    assert {s for s in seen if s[0] == "capture"} == {("capture", True, False)}
    assert running.count("plain") == 3  # warm-up, memory, one round


@pytest.mark.parametrize("args, message", [
    (("--rows", "sd15,sd16"), "--rows: 'sd16' is not one of sd15, sdxl, sd3, flux, sd3-38"),
    (("--rows", ","), "--rows: nothing is not one of sd15, sdxl, sd3, flux, sd3-38"),
    (("--methods", "capture,ast-slow"), "--methods: 'ast-slow' is not one of capture, regulation, regulation-fast, "
                                        "regulation-direct, "
                                        "ast, ast-fast, ast-flex, ast-direct"),
    (("--rows", "sd15,sdxl", "--methods", "ast"), "no row chosen takes --methods ast (sd15 takes capture, regulation, "
                                                  "regulation-fast, regulation-direct; sdxl takes capture, "
                                                  "regulation"),
    (("--rounds", "0"), "--rounds must be a whole number from 1 to 20, not 0"),
])
def test_bad_selection_exits_2_with_the_valid_names(cli, args, message):
    code, out, err = cli("bench", "gpu", "--quick", "--device", "cpu", *args)
    assert code == 2 and message in err and "{" not in out


def test_full_size_rows_need_cuda_and_gpu_flags_need_bench_gpu(cli):
    code, _, err = cli("bench", "gpu")
    assert code == 2 and "run it with --device cuda, or add --quick" in err
    code, _, err = cli("bench", "capture", "--rows", "sd15")
    assert code == 2 and "--rows: only `attnctl bench gpu` takes it" in err
    if not torch.cuda.is_available():
        code, _, err = cli("bench", "gpu", "--device", "cuda")
        assert code == 2 and "no CUDA device; run bench gpu on a machine with a CUDA GPU" in err
        assert "or add --quick --device cpu" in err


def test_the_default_set_is_estimated_within_8_minutes_on_one_h100():
    """Every row states its estimate in the help; the default rows (sd3-38 not among them) add up to at most 480 s,
    and naming more methods raises a row's estimate by its extra pipeline runs."""
    chosen, left_out = gpu.plan()
    assert [r.name for r, _ in chosen] == ["sd15", "sdxl", "sd3", "flux"] and not left_out
    assert gpu.estimate_s(chosen) == sum(r.estimate_s for r, _ in chosen) <= 480
    flux = gpu.plan("flux", "capture,ast,ast-fast")[0]
    assert gpu.estimate_s(flux) == round(160 * 17 / 13)
    from attnctl.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["bench"].format_help().split())
    for row in gpu.ROWS:
        assert f"{row.name} (~{row.estimate_s} s" in text
    assert "default: sd15,sdxl,sd3,flux (~6 min)" in text

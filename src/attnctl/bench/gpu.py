"""`attnctl bench gpu`: issue 10's table in one command — capture, Regulation and AST against the plain pipeline on
full-size random-weight architectures, in the dtypes people run them in, side by side in one process per model.

    attnctl bench gpu --device cuda --json      # every row (about 8 minutes on an H200, model construction included)
    attnctl bench gpu --quick                   # the same rows on the tiny models, on the CPU: a dry run in seconds
"""

from __future__ import annotations

import gc
import time
from contextlib import nullcontext

import torch

from ..methods.ast import AST
from ..methods.capture import Capture
from ..methods.regulation import Regulation
from . import compare, plain
from .ast import LAYOUT

PROMPT = "a photo of a cat and a dog on a sofa"


def _capture(pipe, prompt):
    return [Capture(["cat", "dog"])]


def _regulation(implementation):
    return lambda pipe, prompt: [Regulation(targets=["cat", "dog"], implementation=implementation)]


def _ast(implementation):
    return lambda pipe, prompt: [AST(LAYOUT, implementation=implementation)]


def rows(quick: bool) -> list[tuple]:
    """(label, model spec, dtype name, call kwargs, variants, prompt) per row."""
    def size(full, steps, **extra):
        side = 64 if quick else full
        return dict(height=side, width=side, num_inference_steps=2 if quick else steps, output_type="latent", **extra)

    tiny = "-tiny" if quick else ""
    text = dict(max_sequence_length=32 if quick else 512)
    capture = {"plain": plain, "capture": _capture}
    regulation = {"plain": plain, "fast": _regulation("fast"), "direct": _regulation("direct")}
    ast = {"plain": plain, "fast": _ast("fast"), "flex": _ast("flex"), "direct": _ast("direct")}
    flux = f"random:flux{tiny}"
    return [
        ("SD 1.5 capture", f"random:sd15{tiny}", "float16", size(512, 50), capture, PROMPT),
        ("SD 1.5 Regulation", f"random:sd15{tiny}", "float16", size(512, 50), regulation, PROMPT),
        ("SDXL capture", f"random:sdxl{tiny}", "float16", size(1024, 30), capture, PROMPT),
        ("SDXL Regulation", f"random:sdxl{tiny}", "float16", size(1024, 30), regulation, PROMPT),
        ("SD3 capture", f"random:sd3{tiny}", "float16", size(1024, 28, max_sequence_length=32 if quick else 256),
         capture, PROMPT),
        ("SD3 AST", f"random:sd3{tiny}", "float16", size(1024, 28, max_sequence_length=32 if quick else 256), ast,
         LAYOUT["prompt"]),
        ("SD3 width, 38 blocks (SD3.5-large depth) AST", "random:sd3-tiny?layers=4" if quick else
         "random:sd3?layers=38", "float16", size(1024, 28, max_sequence_length=32 if quick else 256), ast,
         LAYOUT["prompt"]),
        ("FLUX.1-dev capture", flux, "bfloat16", size(1024, 20, guidance_scale=3.5, **text), capture, PROMPT),
        ("FLUX.1-dev AST", flux, "bfloat16", size(1024, 20, guidance_scale=3.5, **text), ast, LAYOUT["prompt"]),
    ]


def environment(device: str) -> dict:
    """The torch and diffusers versions and the device of a run (and the GPU's name on CUDA)."""
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device}
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run(quick: bool = False, device: str = "cpu", on_row=None) -> dict:
    """Every row; `on_row(label, result)` after each (the CLI prints progress). Half precision is used on CUDA only
    (float32 on the CPU)."""
    from ..models import load_pipeline

    cuda = torch.device(device).type == "cuda"
    out = {"environment": environment(device), "rows": {}}
    for label, spec, dtype, kwargs, variants, prompt in rows(quick):
        start = time.perf_counter()
        dtype = getattr(torch, dtype) if cuda else torch.float32
        with torch.device(device) if cuda else nullcontext():  # the 12B transformer is built on the GPU directly
            pipe = load_pipeline(spec, device=device, dtype=dtype)
        results = compare(pipe, variants, prompt, kwargs, repeats=1 if quick else 3, device=device, dtype=dtype)
        row = {"model": spec, "dtype": str(dtype).removeprefix("torch."), "plain_s": results["plain"]["time_s"],
               **{f"{name}_time_ratio": r["time_ratio"] for name, r in results.items() if name != "plain"},
               **{f"{name}_peak_memory_ratio": r["peak_memory_ratio"] for name, r in results.items()
                  if name != "plain"},
               "wall_s": round(time.perf_counter() - start, 1)}
        out["rows"][label] = row
        if on_row:
            on_row(label, row)
        del pipe, results
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    ratios = [v for row in out["rows"].values() for k, v in row.items() if k.endswith("_time_ratio")]
    memory = [v for row in out["rows"].values() for k, v in row.items() if k.endswith("_peak_memory_ratio")]
    out["time_ratio"], out["peak_memory_ratio"] = max(ratios), max(memory)
    return out


def table(results: dict) -> str:
    """The rows as a Markdown table: plain seconds, then each method's time and peak-memory ratio."""
    lines = ["| row | dtype | plain | method / plain: time (peak memory) |", "|---|---|---|---|"]
    for label, row in results["rows"].items():
        methods = [k.removesuffix("_time_ratio") for k in row if k.endswith("_time_ratio")]
        cells = ", ".join(f"{m} {row[m + '_time_ratio']:.2f}× ({row[m + '_peak_memory_ratio']:.3f})" for m in methods)
        lines.append(f"| {label} | {row['dtype']} | {row['plain_s']:.2f} s | {cells} |")
    env = results["environment"]
    lines.append("")
    lines.append(f"{env.get('gpu', env['device'])}, torch {env['torch']}, diffusers {env['diffusers']}")
    return "\n".join(lines)

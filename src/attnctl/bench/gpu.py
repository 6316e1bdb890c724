"""`attnctl bench gpu`: capture, Regulation and AST against the plain pipeline on full-size random-weight
architectures, in the dtypes people run them in; one row per model, the plain pipeline and the row's methods side by
side in one process (`attnctl.bench.compare`: a warm-up, one memory run each, then `rounds` timed rounds, medians).

    attnctl bench gpu --device cuda --json                  # the default rows, one JSON line each as it finishes
    attnctl bench gpu --device cuda --rows flux --methods ast,ast-fast
    attnctl bench gpu --quick --device cpu                  # the same rows on the tiny models: a dry run in seconds

Rows, and the estimate of each on one H100 with the default methods and 3 rounds (model construction, warm-up and
the flex compilation included; 13 pipeline runs for two methods, 9 for one; the plain times are estimates of the
full-size pipelines there, the methods assumed at about 1.3× or less):

| row    | model (random weights)       | call                          | default methods     | estimate |
|--------|------------------------------|-------------------------------|---------------------|----------|
| sd15   | random:sd15, float16         | 512², 50 steps                | capture, regulation | ~40 s    |
| sdxl   | random:sdxl, float16         | 1024², 30 steps               | capture, regulation | ~65 s    |
| sd3    | random:sd3, float16          | 1024², 28 steps, 256 T5       | capture, ast        | ~100 s   |
| flux   | random:flux, bfloat16        | 1024², 20 steps, 512 T5       | capture, ast        | ~160 s   |
| sd3-38 | random:sd3?layers=38, float16 | 1024², 28 steps, 256 T5 (SD3.5-large depth) | ast     | ~110 s   |

The default set is sd15, sdxl, sd3 and flux: about 6 minutes (sd3-38 is left out of it to fit in 8 minutes with room
to spare; name it with --rows). A method much slower than 1.3× lengthens its row by about 4 × (ratio − 1.3) × the
plain time: SDXL's Regulation at the 6–8× estimated before issue 31 adds about 70 s. Other methods a row takes:
regulation-fast, regulation-direct on sd15/sdxl (`regulation` is the default implementation, "auto": compiled on
CUDA, whose first call per layer shape compiles, tens of seconds, inside the row's untimed warm-up); ast-fast,
ast-flex, ast-direct on sd3/sd3-38/flux (`ast` is the default implementation, "auto": flex on CUDA).

Each row's record is handed to `on_row` as it finishes (the CLI prints it as one JSON line, flushed); an error of the
row (the model, the plain pipeline) is its `error`, an error of one method its `<method>_error`, and the other rows
and methods go on.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..methods.ast import AST
from ..methods.capture import Capture
from ..methods.regulation import Regulation
from . import compare, plain
from .ast import LAYOUT

log = logging.getLogger(__name__)

# One prompt for every variant of a row, so they share the plain baseline: it names the capture and Regulation
# targets and is the AST layout's prompt.
PROMPT = LAYOUT["prompt"]
WORDS = ["cat", "dog"]


def _capture(pipe, prompt):
    return [Capture(WORDS)]


def _regulation(implementation):
    return lambda pipe, prompt: [Regulation(targets=WORDS, implementation=implementation)]


def _ast(implementation):
    return lambda pipe, prompt: [AST(LAYOUT, implementation=implementation)]


# The methods a row may run, by name: the variants beside the plain pipeline.
METHODS = {
    "capture": _capture,
    "regulation": _regulation("auto"),
    "regulation-fast": _regulation("fast"),
    "regulation-direct": _regulation("direct"),
    "ast": _ast("auto"),
    "ast-fast": _ast("fast"),
    "ast-flex": _ast("flex"),
    "ast-direct": _ast("direct"),
}
UNET_METHODS = ("capture", "regulation", "regulation-fast", "regulation-direct")
MMDIT_METHODS = ("capture", "ast", "ast-fast", "ast-flex", "ast-direct")


@dataclass(frozen=True)
class Row:
    """One model of the table: its full-size and tiny specs, dtype, call, the methods it takes and runs by default,
    and the estimated seconds of the row on one H100 with those defaults."""

    name: str
    label: str
    model: str
    tiny: str
    dtype: str
    side: int
    steps: int
    methods: tuple[str, ...]
    takes: tuple[str, ...]
    estimate_s: int
    default: bool = True
    extra: dict = field(default_factory=dict)
    tiny_extra: dict = field(default_factory=dict)

    def spec(self, quick: bool) -> str:
        """The model spec: the tiny model for a dry run."""
        return self.tiny if quick else self.model

    def call_kwargs(self, quick: bool) -> dict:
        """The pipeline call's arguments: 64², 2 steps and short text on the tiny models."""
        side, steps = (64, 2) if quick else (self.side, self.steps)
        return dict(height=side, width=side, num_inference_steps=steps, output_type="latent",
                    **(self.tiny_extra if quick else self.extra))


ROWS = (
    Row("sd15", "SD 1.5", "random:sd15", "random:sd15-tiny", "float16", 512, 50, ("capture", "regulation"),
        UNET_METHODS, 40),
    Row("sdxl", "SDXL", "random:sdxl", "random:sdxl-tiny", "float16", 1024, 30, ("capture", "regulation"),
        UNET_METHODS, 65),
    Row("sd3", "SD3", "random:sd3", "random:sd3-tiny", "float16", 1024, 28, ("capture", "ast"), MMDIT_METHODS, 100,
        extra=dict(max_sequence_length=256), tiny_extra=dict(max_sequence_length=32)),
    Row("flux", "FLUX.1-dev", "random:flux", "random:flux-tiny", "bfloat16", 1024, 20, ("capture", "ast"),
        MMDIT_METHODS, 160, extra=dict(max_sequence_length=512, guidance_scale=3.5),
        tiny_extra=dict(max_sequence_length=32, guidance_scale=3.5)),
    Row("sd3-38", "SD3 width, 38 blocks (SD3.5-large depth)", "random:sd3?layers=38", "random:sd3-tiny?layers=4",
        "float16", 1024, 28, ("ast",), MMDIT_METHODS, 110, default=False, extra=dict(max_sequence_length=256),
        tiny_extra=dict(max_sequence_length=32)),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def _names(given, known, what: str) -> list[str]:
    """`given` (a comma list or a list) checked against `known`, in the order given, repeats dropped."""
    names = [n.strip() for n in (given.split(",") if isinstance(given, str) else given)]
    names = [n for n in dict.fromkeys(names) if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        shown = ", ".join(repr(n) for n in unknown) if unknown else "nothing"
        raise UsageError(f"bench gpu {what}: {shown} is not one of {', '.join(known)}")
    return names


def plan(rows=None, methods=None) -> tuple[list[tuple[Row, tuple[str, ...]]], list[str]]:
    """The rows to run, each with its methods, and the rows named or defaulted that take none of `methods` (left
    out). `rows`/`methods`: comma lists or lists of names (None: the default rows, each with its default methods);
    unknown names, or a selection that leaves nothing to run, are a UsageError naming the valid ones."""
    chosen = [r for r in ROWS if r.default] if rows is None else [ROWS[ROW_NAMES.index(n)] for n in
                                                                  _names(rows, ROW_NAMES, "--rows")]
    wanted = None if methods is None else _names(methods, tuple(METHODS), "--methods")
    out, left_out = [], []
    for row in chosen:
        ms = row.methods if wanted is None else tuple(m for m in wanted if m in row.takes)
        if ms:
            out.append((row, ms))
        else:
            left_out.append(row.name)
    if not out:
        takes = "; ".join(f"{r.name} takes {', '.join(r.takes)}" for r in chosen)
        raise UsageError(f"bench gpu: no row chosen takes --methods {','.join(wanted)} ({takes})")
    return out, left_out


def estimate_s(chosen: list[tuple[Row, tuple[str, ...]]]) -> int:
    """The estimated seconds on one H100 of `chosen` (rows with their default methods as tabled; a row with other
    methods scaled by its number of pipeline runs)."""
    def runs(n_methods):
        return 1 + 4 * (1 + n_methods)  # warm-up, a memory run and 3 rounds per variant

    return round(sum(row.estimate_s * runs(len(ms)) / runs(len(row.methods)) for row, ms in chosen))


def environment(device: str) -> dict:
    """The torch and diffusers versions and the device of a run (and the GPU's name on CUDA)."""
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device}
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run_row(row: Row, methods: tuple[str, ...], quick: bool = False, device: str = "cpu", rounds: int = 3) -> dict:
    """One row: its record (model, dtype, call, plain seconds, and per method its seconds, time ratio and peak and
    working memory ratios), with `error` or `<method>_error` where something raised instead of raising."""
    from ..models import load_pipeline

    start = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    dtype = getattr(torch, row.dtype) if cuda else torch.float32
    kwargs = row.call_kwargs(quick)
    record = {"row": row.name, "label": row.label, "model": row.spec(quick), "dtype": str(dtype).removeprefix("torch."),
              "height": kwargs["height"], "width": kwargs["width"], "steps": kwargs["num_inference_steps"],
              "rounds": rounds, "methods": list(methods)}
    pipe = results = None
    try:
        with torch.device(device) if cuda else nullcontext():  # the 12B transformer is built on the GPU directly
            pipe = load_pipeline(row.spec(quick), device=device, dtype=dtype)
        variants = {"plain": plain, **{m: METHODS[m] for m in methods}}
        results = compare(pipe, variants, PROMPT, kwargs, repeats=rounds, device=device, dtype=dtype,
                          keep_going=True)
        record["plain_s"] = results["plain"]["time_s"]
        for m in methods:
            r = results[m]
            if "error" in r:
                record[f"{m}_error"] = r["error"]
                log.warning("bench gpu %s: %s failed: %s", row.name, m, r["error"])
                continue
            record.update({f"{m}_s": r["time_s"], f"{m}_time_ratio": r["time_ratio"],
                           f"{m}_peak_memory_ratio": r["peak_memory_ratio"],
                           f"{m}_working_memory_ratio": r["working_memory_ratio"]})
    except Exception as e:  # the row's record says what failed; the next rows still run
        record["error"] = f"{type(e).__name__}: {e}"
        log.warning("bench gpu %s failed: %s", row.name, record["error"])
    finally:
        del pipe, results
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    record["wall_s"] = round(time.perf_counter() - start, 1)
    return record


def run(quick: bool = False, device: str = "cpu", on_row=None, rows=None, methods=None, rounds: int | None = None
        ) -> dict:
    """The chosen rows (`plan`), one after another; `on_row(record)` after each (the CLI prints it at once). Half
    precision is used on CUDA only (float32 elsewhere); `rounds`: timed rounds (3, or 1 for `quick`)."""
    chosen, _ = plan(rows, methods)
    rounds = (1 if quick else 3) if rounds is None else rounds
    out = {"environment": environment(device), "rows": {}}
    for row, ms in chosen:
        record = run_row(row, ms, quick=quick, device=device, rounds=rounds)
        out["rows"][row.name] = record
        if on_row:
            on_row(record)
    return out


def table(results: dict) -> str:
    """The rows as a Markdown table: plain seconds, then each method's time and peak-memory ratio (or its error)."""
    lines = ["| row | dtype | plain | method / plain: time (peak memory) |", "|---|---|---|---|"]
    for row in results["rows"].values():
        if "error" in row:
            lines.append(f"| {row['label']} | {row['dtype']} | — | error: {row['error']} |")
            continue
        cells = [f"{m} {row[m + '_time_ratio']:.2f}× ({row[m + '_peak_memory_ratio']:.3f})"
                 if m + "_time_ratio" in row else f"{m} error: {row[m + '_error']}" for m in row["methods"]]
        lines.append(f"| {row['label']} | {row['dtype']} | {row['plain_s']:.2f} s | {', '.join(cells)} |")
    env = results["environment"]
    lines.append("")
    lines.append(f"{env.get('gpu', env['device'])}, torch {env['torch']}, diffusers {env['diffusers']}")
    return "\n".join(lines)

"""`attnctl bench`: time and memory of a method against the plain pipeline, side by side."""

from __future__ import annotations

import importlib
import json
import os

from ..errors import UsageError
from ..sampling import SamplingConfig
from .flags import add_arguments

BENCHES = ("capture", "regulation", "ast", "gpu")


def register(sub) -> None:
    """Adds the `attnctl bench` parser."""
    from ..bench.gpu import METHODS, ROWS

    rows = ", ".join(f"{r.name} (~{r.estimate_s} s{'' if r.default else ', not default'})" for r in ROWS)
    default = [r for r in ROWS if r.default]
    p = sub.add_parser("bench", help="time and memory of a method against the plain pipeline, side by side (gpu: "
                       "every method on full-size models, issue 10's table)")
    p.add_argument("what", choices=BENCHES)
    p.add_argument("--quick", action="store_true", help="a small run (under a minute; gpu: the tiny models)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (gpu: one line per row, printed "
                   "and flushed as the row finishes)")
    p.add_argument("--rows", metavar="NAMES", help=f"gpu only: comma-separated rows, with the estimate of each on one "
                   f"H100 with its default methods: {rows}; default: "
                   f"{','.join(r.name for r in default)} (~{sum(r.estimate_s for r in default) / 60:.0f} min)")
    p.add_argument("--methods", metavar="NAMES", help=f"gpu only: comma-separated methods beside the plain pipeline, "
                   f"each run on the chosen rows that take it: {', '.join(METHODS)}; default: each row's own "
                   "(capture with regulation on sd15/sdxl, with ast on sd3/flux)")
    p.add_argument("--rounds", type=int, metavar="N", help="gpu only: timed rounds per row (default 3; 1 with "
                   "--quick)")
    p.add_argument("--jsonl", metavar="FILE", help="gpu only: also append each row's JSON line to FILE as the row "
                   "finishes (kept if the run is cut short)")
    add_arguments(p, SamplingConfig, only=("device",))
    p.set_defaults(func=run)


def run(args) -> None:
    """Runs one benchmark and prints its time and peak-memory ratios (method / plain pipeline), or for gpu the table
    of every method on full-size models (--device cuda, unless --quick); --json: the results as JSON."""
    import torch

    from .common import sampling_of

    gpu_only = [f for f, v in (("--rows", args.rows), ("--methods", args.methods), ("--rounds", args.rounds),
                               ("--jsonl", args.jsonl)) if v is not None]
    if args.what != "gpu" and gpu_only:
        them = "these" if len(gpu_only) > 1 else "it"
        raise UsageError(f"{', '.join(gpu_only)}: only `attnctl bench gpu` takes {them}")
    if args.what == "gpu":
        _gpu(args, torch)
        return
    device = torch.device(sampling_of(args).device)
    results = importlib.import_module(f"attnctl.bench.{args.what}").run(quick=args.quick, device=str(device))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"{args.what}: time ratio {results['time_ratio']:.3f}, peak memory ratio "
              f"{results['peak_memory_ratio']:.3f} (method / plain pipeline)")


def _gpu(args, torch) -> None:
    """`attnctl bench gpu`: the chosen rows, each printed (and appended to --jsonl) as it finishes."""
    from ..bench import gpu
    from .common import sampling_of
    from .flags import given_arguments

    asked = str(given_arguments(SamplingConfig, args).get("device", ""))
    if asked.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {asked}: this torch build or machine has no CUDA device; run bench gpu on "
                         "a machine with a CUDA GPU and a CUDA build of torch, or add --quick --device cpu for the "
                         "same rows on the tiny models")
    device = torch.device(sampling_of(args).device)
    if device.type != "cuda" and not args.quick:
        raise UsageError("bench gpu builds full-size models (FLUX.1-dev's 12B transformer among them): run it "
                         "with --device cuda, or add --quick for the same rows on the tiny models")
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        raise UsageError(f"--rounds must be a whole number from 1 to 20, not {args.rounds}")
    chosen, left_out = gpu.plan(args.rows, args.methods)
    if args.jsonl:
        folder = os.path.dirname(os.path.abspath(args.jsonl))
        if os.path.isdir(args.jsonl) or not os.path.isdir(folder):
            raise UsageError(f"--jsonl {args.jsonl}: name a file in an existing folder")
    if left_out:
        print(f"attnctl: left out (they take none of --methods {args.methods}): {', '.join(left_out)}", flush=True)
    names = ", ".join(f"{row.name} ({', '.join(ms)})" for row, ms in chosen)
    estimate = "" if args.quick else f", estimated {gpu.estimate_s(chosen) / 60:.1f} min on one H100"
    print(f"attnctl: bench gpu rows {names}{estimate}", flush=True)
    env = gpu.environment(str(device))
    if args.json:
        print(json.dumps({"environment": env}), flush=True)
    sink = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None  # noqa: SIM115 - closed below

    def on_row(record):
        line = json.dumps(record, default=str)
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        if args.json:
            print(line, flush=True)
        else:
            state = f"error: {record['error']}" if "error" in record else "done"
            print(f"attnctl: {record['row']}: {state} in {record['wall_s']} s", flush=True)

    try:
        results = gpu.run(quick=args.quick, device=str(device), on_row=on_row, rows=args.rows, methods=args.methods,
                          rounds=args.rounds)
    finally:
        if sink is not None:
            sink.close()
    if not args.json:
        print(gpu.table(results))

"""`attnctl bench`: time and memory of a method against the plain pipeline, side by side."""

from __future__ import annotations

import importlib
import json

from ..errors import UsageError
from ..sampling import SamplingConfig
from .flags import add_arguments

BENCHES = ("capture", "regulation", "ast", "gpu")


def register(sub) -> None:
    """Adds the `attnctl bench` parser."""
    p = sub.add_parser("bench", help="time and memory of a method against the plain pipeline, side by side (gpu: "
                       "every method on full-size models, issue 10's table)")
    p.add_argument("what", choices=BENCHES)
    p.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_arguments(p, SamplingConfig, only=("device",))
    p.set_defaults(func=run)


def run(args) -> None:
    """Runs one benchmark and prints its time and peak-memory ratios (method / plain pipeline), or for gpu the table
    of every method on full-size models (--device cuda, unless --quick); --json: the results as JSON."""
    import torch

    from .common import sampling_of

    device = torch.device(sampling_of(args).device)
    if args.what == "gpu":
        if device.type != "cuda" and not args.quick:
            raise UsageError("bench gpu builds full-size models (FLUX.1-dev's 12B transformer among them): run it "
                             "with --device cuda, or add --quick for the same rows on the tiny models")
        from ..bench import gpu

        results = gpu.run(quick=args.quick, device=str(device),
                          on_row=lambda label, row: print(f"attnctl: {label}: done in {row['wall_s']} s", flush=True))
        print(json.dumps(results, indent=2, default=str) if args.json else gpu.table(results))
        return
    results = importlib.import_module(f"attnctl.bench.{args.what}").run(quick=args.quick, device=str(device))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"{args.what}: time ratio {results['time_ratio']:.3f}, peak memory ratio "
              f"{results['peak_memory_ratio']:.3f} (method / plain pipeline)")

"""`attnctl bench`: time and memory of a method against the plain pipeline, side by side."""

from __future__ import annotations

import importlib
import json

BENCHES = ("capture", "regulation", "ast")


def register(sub) -> None:
    p = sub.add_parser("bench", help="time and memory of a method against the plain pipeline, side by side")
    p.add_argument("what", choices=BENCHES)
    p.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> None:
    results = importlib.import_module(f"attnctl.bench.{args.what}").run(quick=args.quick, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"{args.what}: time ratio {results['time_ratio']:.3f}, peak memory ratio "
              f"{results['peak_memory_ratio']:.3f} (method / plain pipeline)")

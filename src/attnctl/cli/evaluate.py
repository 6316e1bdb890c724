"""`attnctl eval --suite shapes`: the methods compared on shapes-world prompts, scored exactly (`attnctl.eval`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UsageError

METHOD_NAMES = ("none", "regulation", "ast")


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare methods on held-out shapes-world prompts, scored exactly")
    p.add_argument("--suite", choices=["shapes"], default="shapes")
    p.add_argument("--methods", default="none,regulation,ast",
                   help="comma-separated: none, regulation (on the UNet model), ast (on the MMDiT model); "
                        "with ast, 'none' also runs on the MMDiT model as its baseline")
    p.add_argument("--prompts", type=int, default=20, help="prompts per category, at most 20 (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per prompt (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--unet-model", default="builtin:shapes-unet")
    p.add_argument("--mmdit-model", default="builtin:shapes-mmdit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a small subset, under a minute")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--out", type=Path, default=Path("out/eval"))
    p.set_defaults(func=run)


def run(args) -> None:
    from accelerate import PartialState

    from ..eval import DEFAULT_GUIDANCE, DEFAULT_STEPS, QUICK_STEPS, build_suite, run_suite, summarize, write_results

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    methods = [(m, args.unet_model) for m in names if m in ("none", "regulation")]
    if "ast" in names:
        methods += ([("none", args.mmdit_model)] if "none" in names else []) + [("ast", args.mmdit_model)]
    prompts, seeds = (3, 1) if args.quick else (args.prompts, args.seeds)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    rows = run_suite(methods, build_suite(prompts), list(range(seeds)), steps, guidance, device=args.device)
    if not PartialState().is_main_process:
        return
    summary = summarize(rows)
    write_results(rows, summary, args.out, "attnctl " + " ".join(sys.argv[1:]))
    print(json.dumps(summary, indent=2) if args.json else (args.out / "results.md").read_text())

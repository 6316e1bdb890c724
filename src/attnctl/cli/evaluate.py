"""`attnctl eval --suite shapes`: the methods compared on shapes-world prompts, scored exactly (`attnctl.eval`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..config import build, flag_of
from ..defaults import DEFAULT_JOINT_MODEL, DEFAULT_MODEL
from ..errors import UsageError
from ..methods.registry import METHODS, PLAIN, choices, listing, methods_on
from ..sampling import SamplingConfig
from .common import add_method_options, bounded, check_out, sampling_of
from .flags import add_arguments, argument_type, given_arguments


def dosed_methods() -> tuple[str, ...]:
    """The methods with a `strength` option, which --dose sweeps."""
    return tuple(name for name, m in METHODS.items() if "strength" in {f.name for f in fields(m.config)})


def register(sub) -> None:
    """Adds the `attnctl eval` parser."""
    p = sub.add_parser("eval", help="compare methods on held-out shapes-world prompts, scored exactly")
    p.add_argument("--suite", choices=["shapes"], default="shapes")
    # each method runs on the built-in model it is declared for, or the one --unet-model / --mmdit-model names
    unet_methods, mmdit_methods = methods_on(DEFAULT_MODEL), methods_on(DEFAULT_JOINT_MODEL)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated: {listing(unet_methods)} (on the UNet model), {listing(mmdit_methods)} (on "
                        f"the MMDiT model); '{PLAIN}' is the plain model each method runs on (the UNet model when "
                        "alone; default: none,regulation,ast)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per category, at most 20 (default: 20; 3 with "
                   "--quick)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default: 10; 1 with --quick)")
    # --steps, --guidance (default: each model's recommendation, from its attnctl.json, else 25 and 5.0), --device
    add_arguments(p, SamplingConfig, title="sampling", only=("steps", "guidance", "device"))
    p.add_argument("--unet-model", default="builtin:shapes-unet")
    p.add_argument("--mmdit-model", default="builtin:shapes-mmdit")
    p.add_argument("--quick", action="store_true",
                   help="a small subset (3 prompts per category, 1 seed, 10 steps unless given), under a minute")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--dose", choices=dosed_methods(), default=None,
                   help="instead of the comparison: sweep this method's strength (0 = the plain model) on the "
                        "held-out categories; writes dose.md, dose.csv and dose.png")
    p.add_argument("--strengths", type=argument_type(_strengths), default=None,
                   help="strengths of --dose, comma-separated (default: 0,0.5,1,2,4)")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the attention measurements (target coverage, in-region shares)")
    p.add_argument("--categories", type=argument_type(_categories), default=None,
                   help="comma-separated categories to run (default: all but single_objects; with --dose the held-out "
                        "ones); e.g. seen_pairs to choose a model's "
                        "recommended method options without looking at the held-out prompts")
    p.add_argument("--out", type=Path, default=Path("out/eval"))
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cases a stopped run of the same arms, options, sampling and seeds finished "
                        "(kept in OUT/checkpoint, one line per case); --no-resume starts afresh (default: resume)")
    for name in METHODS:  # method options override the model's recommendations in every arm of that method
        add_method_options(p, name)
    p.set_defaults(func=run)


def _categories(text: str) -> list[str]:
    from ..eval import CATEGORIES

    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise UsageError(f"--categories {text!r}: choose from {', '.join(CATEGORIES)}")
    return names


def _method_options(args) -> dict[str, dict]:
    given = {name: given_arguments(METHODS[name].config, args) for name in METHODS}
    if any("targets" in options for options in given.values()):
        raise UsageError("--targets does not apply to eval: each prompt's shape words are the targets")
    for name, options in given.items():
        build(METHODS[name].config, None, **options)  # bad values fail here, before any model loads
    return given


DEFAULT_METHODS = "none,regulation,ast"
DOSE_STRENGTHS = [0.0, 0.5, 1.0, 2.0, 4.0]


def _refuse_what_cannot_act(args, options: dict[str, dict]) -> None:
    """Flags this eval would ignore: --strengths without --dose, --methods with --dose, a method's options when
    that method is not run."""
    if args.strengths is not None and not args.dose:
        raise UsageError("--strengths are the strengths of --dose: add --dose METHOD, or drop --strengths")
    if args.methods is not None and args.dose:
        raise UsageError("--dose sweeps one method against the plain model; --methods does not apply: drop it")
    methods = DEFAULT_METHODS if args.methods is None else args.methods
    run = {args.dose} if args.dose else {m.strip() for m in methods.split(",")}
    for name, given in options.items():
        if given and name not in run:
            flags = ", ".join(flag_of(METHODS[name].config, field) for field in given)
            arms = f"--dose {args.dose}" if args.dose else f"--methods {methods}"
            kind = "an option" if len(given) == 1 else "options"
            raise UsageError(f"{flags}: {kind} of {name}, which this eval does not run ({arms}); add {name} or drop "
                             f"{'it' if len(given) == 1 else 'them'}")


def _strengths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--strengths {text!r}: write numbers such as 0,0.5,1,2") from None
    if not values or any(not v >= 0 for v in values):
        raise UsageError(f"--strengths {text!r}: give one or more strengths >= 0")
    if len(set(values)) < len(values):
        raise UsageError(f"--strengths {text!r} repeats a strength; give each once")
    return values


def _checkpoint(args) -> Path:
    """OUT/checkpoint, emptied first with --no-resume (by the main process only)."""
    from accelerate import PartialState

    folder = args.out / "checkpoint"
    if not args.resume and folder.is_dir() and PartialState().is_main_process:
        for path in folder.glob("rows-*.jsonl"):
            path.unlink()
    PartialState().wait_for_everyone()
    return folder


def run(args) -> None:
    """Run the comparison (or the --dose sweep) and write results.md/.csv/.json and the figures to --out."""
    from accelerate import PartialState

    from ..eval import (
        DEFAULT_CATEGORIES,
        HELDOUT_CATEGORIES,
        QUICK_STEPS,
        Arm,
        build_suite,
        dose_arms,
        run_suite,
        summarize,
        write_dose,
        write_results,
        write_rows,
    )

    for flag, value, high in (("--prompts", args.prompts, 20), ("--seeds", args.seeds, 1000)):
        bounded(flag, value, 1, high)
    sampling = sampling_of(args)
    check_out(args.out)
    prompts = args.prompts or (3 if args.quick else 20)
    seeds = args.seeds or (1 if args.quick else 10)
    steps = sampling.steps if sampling.steps is not None else QUICK_STEPS if args.quick else None  # None: the model's
    guidance = sampling.guidance
    cases = build_suite(prompts)
    wanted = args.categories or (HELDOUT_CATEGORIES if args.dose else DEFAULT_CATEGORIES)
    cases = [c for c in cases if set(c.categories) & set(wanted)]
    options = _method_options(args)
    _refuse_what_cannot_act(args, options)
    command = args.command_line
    if args.dose:
        args.strengths = args.strengths or DOSE_STRENGTHS
        model = args.unet_model if args.dose in methods_on(DEFAULT_MODEL) else args.mmdit_model
        rows = run_suite(dose_arms(args.dose, model, args.strengths, options[args.dose]), cases, list(range(seeds)),
                         steps, guidance, device=sampling.device, measure=not args.no_attention,
                         checkpoint=_checkpoint(args))
        if not PartialState().is_main_process:
            return
        summary = summarize(rows)
        write_dose(summary, args.strengths, args.dose, args.out, command)
        write_rows(rows, args.out / "dose.csv")
        print(json.dumps(summary, indent=2) if args.json else (args.out / "dose.md").read_text())
        return
    args.methods = DEFAULT_METHODS if args.methods is None else args.methods
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in choices()]
    if unknown or not names:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or repr(args.methods)}; choose from "
                         f"{', '.join(choices())}")
    if len(set(names)) < len(names):
        raise UsageError(f"--methods {args.methods!r} names a method twice; give each once (its arms would be "
                         "merged under one label)")
    mmdit = [m for m in names if m in methods_on(DEFAULT_JOINT_MODEL)]
    unet = any(m in methods_on(DEFAULT_MODEL) for m in names) or not mmdit
    arms = [Arm(m, args.unet_model, options.get(m, {})) for m in names if m in (PLAIN, *methods_on(DEFAULT_MODEL))
            and unet]
    if mmdit:
        arms += ([Arm(PLAIN, args.mmdit_model)] if PLAIN in names else []) + [
            Arm(m, args.mmdit_model, options[m]) for m in mmdit]
    rows = run_suite(arms, cases, list(range(seeds)), steps, guidance, device=sampling.device,
                     measure=not args.no_attention, checkpoint=_checkpoint(args))
    if not PartialState().is_main_process:
        return
    summary = summarize(rows)
    write_results(rows, summary, args.out, command)
    print(json.dumps(summary, indent=2) if args.json else (args.out / "results.md").read_text())

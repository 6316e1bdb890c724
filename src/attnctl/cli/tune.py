"""`attnctl tune`: a method's options chosen for a shapes-world model on its seen split (`attnctl.tune`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import cli_fields, comma_list, default_of, text_parser
from ..errors import UsageError
from ..methods.registry import METHODS, method
from ..sampling import SamplingConfig
from .common import bounded, check_out, sampling_of
from .flags import add_arguments, argument_type


def register(sub) -> None:
    """Adds the `attnctl tune` parser."""
    p = sub.add_parser("tune", help="choose a method's options for a shapes-world model on its seen prompts")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--model", default=None, help="a shapes-world model (default: the method's built-in model)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2",
                   help="values of one config field to try (repeat for more fields: every combination is tried); "
                        "default: the method's declared grid")
    p.add_argument("--category", default=None,
                   help="the seen categories to choose on, comma-separated, their samples pooled (default: the "
                        "method's: seen_placed_pairs for a layout method, seen_pairs for the others; also "
                        "seen_placed_triples, seen_triples)")
    p.add_argument("--prompts", type=int, default=8, help="seen prompts (default: 8)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default: 4)")
    add_arguments(p, SamplingConfig, title="sampling", only=("steps", "device"))
    p.add_argument("--heldout", action="store_true",
                   help="afterwards, measure the choice against the plain model on the held-out categories "
                        "(reported separately; never used in the choice)")
    p.add_argument("--write", action="store_true",
                   help="write the choice into the model folder's attnctl.json as its recommendation")
    p.add_argument("--out", type=Path, default=Path("out/tune"))
    p.set_defaults(func=run)


def _grid(m, sets: list[str]) -> dict[str, list]:
    """The --set values, each parsed as its field's flag parses it; the declared grid without --set."""
    if not sets:
        if not m.tune_grid:
            raise UsageError(f"{m.name} declares no grid to tune: give --set FIELD=V1,V2")
        return dict(m.tune_grid)
    fields = {f.name: f for f in cli_fields(m.config) if f.name != "targets"}
    grid = {}
    for text in sets:
        name, sep, values = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not comma_list(values):
            raise UsageError(f"--set {text!r}: write FIELD=V1,V2 such as --set weight=10,25")
        if name not in fields:
            raise UsageError(f"--set {text!r}: {m.name} has no option {name!r}; its options are "
                             f"{', '.join(sorted(fields))}")
        if name in grid:
            raise UsageError(f"--set names {name} twice; give all its values in one --set")
        f = fields[name]
        parse = _boolean if isinstance(default_of(f), bool) else text_parser(f)
        try:
            grid[name] = [argument_type(parse)(v) for v in comma_list(values)]
        except (ValueError, TypeError) as err:
            raise UsageError(f"--set {text!r}: {err}") from None
    return grid


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"write true or false, not {text!r}")
    return text.lower() == "true"


def run(args) -> None:
    """Tunes the method's options on its seen split against the plain model; writes tune.csv, tune.json and tune.md
    to --out, with --heldout the held-out comparison, with --write the model's recommendation."""
    from ..eval import Arm, build_suite, run_suite, summarize, write_results, write_rows
    from ..tune import seen_categories, table, tune, write_recommendation

    m = method(args.method)
    model = args.model or m.builtin_model
    bounded("--prompts", args.prompts, 1, 20)
    bounded("--seeds", args.seeds, 1, 1000)
    sampling = sampling_of(args)
    grid = _grid(m, args.set)
    categories = seen_categories(m, args.category)
    category = "+".join(categories)
    check_out(args.out)
    candidates, rows = tune(m, model, grid, args.prompts, args.seeds, steps=sampling.steps, device=sampling.device,
                            categories=categories)
    best = candidates[0]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"Tuning {m.name} on {model}, seen split {category} ({args.prompts} prompts x {args.seeds} seeds), "
             f"paired with the plain model. Command: `{args.command_line}`", "", *table(candidates, category)]
    write_rows(rows, args.out / "tune.csv")
    (args.out / "tune.json").write_text(json.dumps({"method": m.name, "model": model, "grid": grid,
                                                    "chosen": best.options}, indent=2) + "\n")
    print("\n".join(lines))
    print(f"\nchosen: {', '.join(f'{k}={v}' for k, v in best.options.items())}")
    if args.heldout:
        cases = [c for c in build_suite(20) if set(c.categories) & set(m.heldout_categories)]
        held = run_suite([Arm("none", model), Arm(m.name, model, best.options)], cases, list(range(args.seeds)),
                         steps=sampling.steps, device=sampling.device, measure=False)
        write_results(held, summarize(held), args.out / "heldout", args.command_line)
        lines += ["", "Held out (after the choice):", "", (args.out / "heldout" / "results.md").read_text()]
        print((args.out / "heldout" / "results.md").read_text())
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    if args.write:
        write_recommendation(model, m, best.options)  # logged

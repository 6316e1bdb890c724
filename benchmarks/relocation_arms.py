"""Relocation's options side by side on seen categories, each arm paired with the plain model on the same samples.

    python benchmarks/relocation_arms.py --model builtin:shapes-unet --categories seen_triples --seeds 20 \
        --arm base= --arm restart=restart:true --arm read24=read_fraction:0.24

An arm is `label=field:value;field:value` over the model's recommended relocation options (`label=` alone: the
recommendation itself). Each arm's rows are kept in `--out/<label>.csv` (plain's in `none.csv`), so an arm already run
is read back, not run again. Prints per arm and category: the success rate, presence, placement, fixed/broken against
plain and the exact McNemar p."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from probe_rows import arm_rows, fixed_broken  # noqa: E402

from attnctl.eval import Arm, build_suite, mcnemar, run_suite  # noqa: E402


def parse_arm(text: str) -> tuple[str, dict]:
    label, _, spec = text.partition("=")
    options = {}
    for item in filter(None, spec.split(";")):
        name, _, value = item.partition(":")
        options[name] = {"true": True, "false": False}.get(value.lower(), value)
        try:
            options[name] = float(value)
        except ValueError:
            pass
    return label, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:shapes-unet")
    parser.add_argument("--categories", default="seen_triples,seen_placed_pairs")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--arm", action="append", default=[], help="label=field:value;field:value")
    parser.add_argument("--out", type=Path, default=Path("out/relocation-arms"))
    args = parser.parse_args()

    def rate(rows: dict, column: str) -> float:
        return sum(int(r[column]) for r in rows.values()) / len(rows)

    categories = args.categories.split(",")
    cases = [c for c in build_suite(args.prompts) if set(c.categories) & set(categories)]
    seeds = list(range(args.seeds))
    out = args.out / args.model.split(":")[-1]
    out.mkdir(parents=True, exist_ok=True)

    def rows_of(label: str, arm: Arm) -> dict:
        return arm_rows(out / f"{label}.csv", lambda: run_suite([arm], cases, seeds, measure=False, progress=True))

    plain = rows_of("none", Arm("none", args.model))
    print("| arm | category | n | success | plain | present | plain present | placed | fixed | broken | p |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for text in args.arm:
        label, options = parse_arm(text)
        rows = rows_of(label, Arm("relocation", args.model, options, label=label))
        for category in categories:
            mine = {k: r for k, r in rows.items() if r["category"] == category}
            base = {k: plain[k] for k in mine}
            n = len(mine)
            if not n:
                continue
            fixed, broken = fixed_broken(mine, base, "success")
            print(f"| {label} | {category} | {n} | {rate(mine, 'success'):.3f} | {rate(base, 'success'):.3f} | "
                  f"{rate(mine, 'present'):.3f} | {rate(base, 'present'):.3f} | {rate(mine, 'placed'):.3f} | "
                  f"{fixed} | {broken} | {mcnemar(fixed, broken):.2g} |", flush=True)


if __name__ == "__main__":
    main()

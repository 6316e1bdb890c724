"""Where does placement fail, and what places objects? (issue 28, step 1: seen data only.) Arms of the layout methods
with options, and the plain model, on random layouts of seen pairs (`seen_placed_pairs`), every arm paired with the
plain model on the same prompts and seeds:

    python benchmarks/placement.py [--model mmdit|unet] [--prompts 16] [--seeds 4] [--arms a,b] [--out out/placement]

Each arm's rows go to OUT/MODEL/ARM.csv as soon as the arm finishes, and an arm whose file exists is not run again, so
an interrupted run resumes where it stopped. The table (placed, present, bound, fixed/broken against plain, exact
McNemar p, in-region attention share, seconds per image) is printed and written to OUT/MODEL/results.md."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from attnctl.defaults import DEFAULT_JOINT_MODEL
from attnctl.eval import Arm, build_suite, paired_with_plain, run_suite, write_rows
from attnctl.methods.layout_modulation import LayoutModulation, LayoutModulationConfig, pulled_and_pushed
from attnctl.methods.registry import METHODS, Method


class RegionalMask(LayoutModulation):
    """An experiment, not a method (dense N×N scores): in the masked steps an image token of region r attends only to
    the image tokens of region r (background to background), to r's phrase and to text in no phrase: the image is
    denoised as separate regions, each told only its own phrase."""

    def wants(self, site):
        return site.kind == "joint"

    def __call__(self, call):
        tables = self._active_tables(call)
        if tables is None:
            return
        rows = call.step.cond_rows
        q, k, v = (t[rows].float() for t in (call.q, call.k, call.v))
        img = tables.img_label
        allowed = torch.ones(q.shape[0], q.shape[2], k.shape[2], dtype=torch.bool)
        allowed[:, call.image, call.text] = ~pulled_and_pushed(tables)[1]
        allowed[:, call.image, call.image] = img[:, :, None] == img[:, None, :]
        scores = (q @ k.transpose(-1, -2)) * call.scale
        out = call.output().clone()
        out[rows] = (torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1) @ v).to(out.dtype)
        call.set_output(out)


METHODS["regional-mask"] = Method("regional-mask", RegionalMask, LayoutModulationConfig, "layout", ("joint",),
                                  DEFAULT_JOINT_MODEL, "experiment: regions denoised apart")

MODELS = {"mmdit": "builtin:shapes-mmdit", "unet": "builtin:shapes-unet"}
# label: (method, options)
ARMS = {
    "plain": ("none", {}),
    "ast": ("ast", {}),  # the model's recommendation (attnctl.json)
    "ast-published": ("ast", {"strength": 1.0}),
    "lm": ("layout-modulation", {}),
    "lm-strong-20": ("layout-modulation", {"weight": 25.0, "power": 0.0, "steps_fraction": 0.2}),
    "lm-strong-40": ("layout-modulation", {"weight": 25.0, "power": 0.0, "steps_fraction": 0.4}),
    "mask-20": ("layout-modulation", {"hard_mask": True, "power": 0.0, "steps_fraction": 0.2}),
    "mask-40": ("layout-modulation", {"hard_mask": True, "power": 0.0, "steps_fraction": 0.4}),
    "mask-100": ("layout-modulation", {"hard_mask": True, "power": 0.0, "steps_fraction": 1.0}),
    "regions-20": ("regional-mask", {"power": 0.0, "steps_fraction": 0.2}),
    "regions-40": ("regional-mask", {"power": 0.0, "steps_fraction": 0.4}),
    "relocate-08": ("relocation", {"read_fraction": 0.08}),
    "relocate-16": ("relocation", {"read_fraction": 0.16}),
    "relocate-24": ("relocation", {"read_fraction": 0.24}),
    "relocate-32": ("relocation", {"read_fraction": 0.32}),
}
COLUMNS = ("placed", "present", "bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mmdit")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--category", default="seen_placed_pairs")
    parser.add_argument("--out", type=Path, default=Path("out/placement"))
    parser.add_argument("--no-attention", action="store_true", help="skip the attention measurements (faster)")
    args = parser.parse_args()
    model = MODELS[args.model]
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in build_suite(args.prompts) if args.category in c.categories]
    labels = ["plain"] + [a for a in args.arms.split(",") if a and a != "plain"]
    unknown = [a for a in labels if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; the arms are {', '.join(ARMS)}")
    rows = []
    for label in labels:
        path = out / f"{label}.csv"
        if not path.exists():
            method, options = ARMS[label]
            if method == "ast" and args.model == "unet":
                continue
            arm = Arm(method, model, options, label=f"{'none' if method == 'none' else label} ({args.model})")
            write_rows(run_suite([arm], cases, list(range(args.seeds)), measure=not args.no_attention), path)
        with open(path) as f:
            rows += [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    lines = [f"Placement on {model}, {args.category}: {len(cases)} prompts x {args.seeds} seeds, paired with plain.",
             "", "| arm | placed | fixed | broken | McNemar p | present | bound | share (instance) | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    paired = paired_with_plain(rows, "placed")
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        rate = {c: sum(r[c] for r in mine) / len(mine) for c in COLUMNS}
        shares = [r["share_instance"] for r in mine if r.get("share_instance") not in (None, "")
                  and r["share_instance"] == r["share_instance"]]
        p = paired.get((label, args.category))
        pair = f"{p['fixed']} | {p['broken']} | {p['mcnemar_p']:.3g}" if p else "— | — | —"
        share = f"{sum(shares) / len(shares):.3f}" if shares else "—"
        seconds = sum(r["seconds"] for r in mine) / len(mine)
        lines.append(f"| {label} | {rate['placed']:.3f} | {pair} | {rate['present']:.3f} | {rate['bound']:.3f} | "
                     f"{share} | {seconds:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()

"""Where does binding fail? (issue 29, step 1: seen data only.) The plain model's images of seen pairs (or triples),
scored, with what its attention did in the first steps, read as the binding method reads it (the same maps; the
latents are not moved):

    python benchmarks/binding_probe.py [--model unet|mmdit] [--category seen_pairs|seen_triples] [--prompts 32]
                                       [--seeds 8] [--out out/binding-probe]

Per image and early step: SynGen's loss, Attend-and-Excite's loss on the nouns (1 − the weakest noun's smoothed
maximum: does it predict a missing shape?), and the *margin* of each colour word: the symmetric KL between its map and
the other object's noun map minus that to its own noun's (positive: the colour's attention lies nearer its own
noun); the image's margin is the smallest over its colour words and the other nouns. Among the images with every
shape present, how well each quantity separates the mis-bound images from the bound ones is the AUC (the probability
that a mis-bound image has the worse value), with a 95% bootstrap interval over prompts. Rows go to
OUT/MODEL[-CATEGORY]/rows.csv (resumed per prompt), the table to results.md beside them."""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import numpy as np
import torch
from probe_rows import append_rows

import attnctl
from attnctl.eval import build_suite, sample_seed, score_case
from attnctl.methods.attend_excite_math import max_attention_per_token, neglect_loss
from attnctl.methods.binding import Binding
from attnctl.methods.binding_math import pixel_distributions, syngen_loss, word_distance
from attnctl.models import load_pipeline, sampling_defaults

MODELS = {"mmdit": "builtin:shapes-mmdit", "unet": "builtin:shapes-unet"}
STEPS_READ = 5


class EarlyAttention(Binding):
    """The binding method's reading of the maps, recorded at the first steps, with step size 0 (the plain image)."""

    def __init__(self, targets):
        super().__init__(targets, step_size=0.0, presence=0.0, max_iter_to_alter=STEPS_READ)
        self.records: list[dict] = []

    def image_loss(self, maps, prompt):
        groups = self._groups[prompt]
        dists = pixel_distributions(maps.detach())
        margins = [float(word_distance(dists, g.modifiers[0], other.noun) - word_distance(dists, g.modifiers[0],
                                                                                          g.noun))
                   for g in groups for other in groups if other is not g]
        self.records.append({"loss": float(syngen_loss(maps.detach(), groups)), "margin": min(margins),
                             "neglect": float(neglect_loss(max_attention_per_token(maps.detach(),
                                                                                   self._nouns[prompt])))})
        return super().image_loss(maps, prompt)


def auc(worse: list[float], better: list[float]) -> float:
    """P(a value of `worse` < a value of `better`), ties counted half."""
    if not worse or not better:
        return float("nan")
    w, b = np.asarray(worse)[:, None], np.asarray(better)[None, :]
    return float(((w < b).sum() + 0.5 * (w == b).sum()) / (w.size * b.size))


def auc_with_interval(rows: list[dict], key: str, sign: float, outcome: str = "bound",
                      draws: int = 2000) -> tuple[float, float, float]:
    """AUC of `sign`·value separating the failed images (lower) from the others (`outcome` 1), with a bootstrap over
    prompts."""
    def one(sample):
        return auc([sign * r[key] for r in sample if not r[outcome]], [sign * r[key] for r in sample if r[outcome]])

    prompts = sorted({r["prompt"] for r in rows})
    by_prompt = {p: [r for r in rows if r["prompt"] == p] for p in prompts}
    rng = random.Random(0)
    values = [one([r for p in rng.choices(prompts, k=len(prompts)) for r in by_prompt[p]]) for _ in range(draws)]
    values = [v for v in values if not np.isnan(v)]
    return one(rows), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="unet")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--category", choices=("seen_pairs", "seen_triples"), default="seen_pairs")
    parser.add_argument("--out", type=Path, default=Path("out/binding-probe"))
    args = parser.parse_args()
    model = MODELS[args.model]
    out = args.out / args.model if args.category == "seen_pairs" else args.out / f"{args.model}-{args.category}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    done = {r["prompt"] for r in rows}
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    sampling = sampling_defaults(model)
    cases = [c for c in build_suite(args.prompts) if args.category in c.categories]
    seeds = list(range(args.seeds))
    for n, case in enumerate(cases):
        if case.prompt in done:
            continue
        probe = EarlyAttention([s for _, s in case.objects])
        with attnctl.apply(pipe, probe, prompt=case.prompt) as session:
            images = session(case.prompt, num_images_per_prompt=len(seeds),
                             generator=[torch.Generator().manual_seed(sample_seed(case, s)) for s in seeds],
                             num_inference_steps=sampling.get("num_inference_steps", 25),
                             guidance_scale=sampling.get("guidance_scale", 5.0)).images
        new = []
        for k, (seed, image) in enumerate(zip(seeds, images)):
            s = score_case(case, image)
            row = {"prompt": case.prompt, "seed": seed, "present": int(s["present"]), "bound": int(s["bound"])}
            for step in range(STEPS_READ):  # records: step-major, one per image
                rec = probe.records[step * len(seeds) + k]
                for key in ("loss", "margin", "neglect"):
                    row[f"{key}{step}"] = round(rec[key], 6)
            new.append(row)
        append_rows(path, new)
        rows += new
        print(f"{n + 1}/{len(cases)} {case.prompt}: bound {sum(r['bound'] for r in new)}/{len(new)}", flush=True)
    for r in rows:
        for k in r:
            if k != "prompt":
                r[k] = float(r[k])
    present = [r for r in rows if r["present"]]
    lines = [f"# Binding probe on {model} ({args.category}, plain images)", "",
             f"{len(rows)} images, {len(present)} with every shape, {int(sum(r['bound'] for r in present))} bound.",
             "", "| quantity | step | failure predicted | AUC (the failed image has the worse value) | 95% interval |",
             "|---|---|---|---|---|"]
    for step in range(STEPS_READ):
        for key, sign, name, outcome, sample in (
                (f"margin{step}", 1.0, "colour margin (own noun vs other)", "bound", present),
                (f"loss{step}", -1.0, "SynGen loss", "bound", present),
                (f"neglect{step}", -1.0, "weakest noun (Attend-and-Excite's loss)", "present", rows)):
            a, lo, hi = auc_with_interval(sample, key, sign, outcome)
            failure = "mis-bound (among present)" if outcome == "bound" else "a shape missing"
            lines.append(f"| {name} | {step} | {failure} | {a:.3f} | {lo:.3f}–{hi:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Does the model's own early denoising foresee a missing object? (issues 28/29: a probe on seen data.)

    python benchmarks/presence_probe.py [--model mmdit] [--category seen_triples] [--prompts 24] [--seeds 8]

On the MMDiT the failures of pairs and triples are missing shapes, and the early attention does not foresee them
(BENCHMARKS.md, "Step 1 on the MMDiT": AUC 0.49-0.51). This probe reads, during plain runs, object i's *contrast*
at the end of steps k: ‖ε(x, t, prompt) − ε(x, t, prompt without object i)‖ per latent cell (the contrast locator's
map), summarised per image as the weakest object's mean contrast relative to the strongest's (`ratio`), the weakest
object's mean contrast (`weakest`) and three more scores (`features`); each is reported as an AUC over all images and
within each prompt (what a choice among one prompt's noises compares). If an image whose weakest object barely
contrasts is the one that comes out without it (AUC well above 0.5 within a prompt), the starting noise can be chosen
by it (a few candidates, the first k steps each) before the run goes on. Rows (one per image: the quantities per step
and whether every object is present / bound) are kept in OUT/rows.csv and read back on a rerun."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from binding_probe import auc_with_interval
from contrast_locator_probe import call_of, prediction, without
from probe_rows import append_rows

from attnctl.eval import build_suite, score_case
from attnctl.models import load_pipeline, sampling_defaults

MODELS = {"mmdit": "builtin:shapes-mmdit"}


def contrasts(pipe, case, seeds, sampling, steps) -> tuple[list, dict]:
    """The case's plain images and, per read step, the (images, objects) mean contrast of each object."""
    read = {}

    def cb(p, i, t, x):
        if i in steps and i + 1 < len(p.scheduler.timesteps):
            z = x["latents"]
            t_next = p.scheduler.timesteps[i + 1]
            with torch.no_grad():
                full = prediction(p, z, t_next, case.prompt)
                read[i] = torch.stack([(full - prediction(p, z, t_next, without(case.prompt, ph))).norm(dim=1)
                                       .flatten(1) for ph in case.phrases], 1)  # (images, objects, cells)
        return {}

    images = pipe(case.prompt, **call_of(case, seeds, sampling), callback_on_step_end=cb).images
    return images, read


def features(maps: torch.Tensor) -> dict:
    """An image's scores from its objects' contrast maps (objects × cells): the weakest object's mean contrast
    (`weakest`) and over the strongest's (`ratio`); the same with each object's peak (`peak_ratio`); the least
    concentrated object's share of its contrast in its top tenth of cells (`concentration`); minus the largest cosine
    overlap of two objects' maps (`apart`: objects forming in the same place)."""
    mean, peak = maps.mean(1), maps.max(1).values
    top = max(1, maps.shape[1] // 10)
    share = maps.topk(top, dim=1).values.sum(1) / maps.sum(1)
    unit = torch.nn.functional.normalize(maps, dim=1)
    cosine = unit @ unit.T
    overlap = max(float(cosine[a, b]) for a in range(len(maps)) for b in range(a + 1, len(maps)))
    return {"weakest": float(mean.min()), "ratio": float(mean.min() / mean.max()),
            "peak_ratio": float(peak.min() / peak.max()), "concentration": float(share.min()), "apart": -overlap}


def within_prompt_auc(rows: list[dict], key: str, outcome: str = "present") -> float:
    """AUC of `key` for `outcome` counted only over pairs of images of the same prompt (what a choice among one
    prompt's candidates compares)."""
    wins = pairs = 0.0
    for prompt in {r["prompt"] for r in rows}:
        mine = [r for r in rows if r["prompt"] == prompt]
        for good in (r[key] for r in mine if r[outcome]):
            for bad in (r[key] for r in mine if not r[outcome]):
                pairs += 1
                wins += 1.0 if good > bad else 0.5 if good == bad else 0.0
    return wins / pairs if pairs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mmdit")
    parser.add_argument("--category", choices=("seen_pairs", "seen_triples"), default="seen_triples")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", default="5,7,9")
    parser.add_argument("--out", type=Path, default=Path("out/presence-probe"))
    args = parser.parse_args()
    model = MODELS[args.model]
    steps = [int(s) for s in args.steps.split(",")]
    out = args.out / f"{args.model}-{args.category}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    done = {r["prompt"] for r in rows}
    cases = [c for c in build_suite(args.prompts) if c.categories == (args.category,)]
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    sampling = sampling_defaults(model)
    seeds = list(range(args.seeds))
    for n, case in enumerate(cases):
        if case.prompt in done:
            continue
        images, read = contrasts(pipe, case, seeds, sampling, steps)
        new = []
        for j, (seed, image) in enumerate(zip(seeds, images)):
            s = score_case(case, image)
            row = {"prompt": case.prompt, "seed": seed, "present": int(s["present"]), "bound": int(s["bound"])}
            for k, values in read.items():
                row.update({f"{name}_{k}": value for name, value in features(values[j]).items()})
            new.append(row)
        append_rows(path, new)
        rows += new
        print(f"{n + 1}/{len(cases)}", flush=True)
    rows = [{k: (v if k == "prompt" else float(v)) for k, v in r.items()} for r in rows]
    present = sum(r["present"] for r in rows)
    print(f"\n{model}, {args.category}, plain: {len(rows)} images, every object present in {present:.0f}\n")
    names = [n for n in ("weakest", "ratio", "peak_ratio", "concentration", "apart") if f"{n}_{steps[-1]}" in rows[0]]
    print("| step | score | AUC for 'every object present' [95%] | within a prompt |")
    print("|---|---|---|---|")
    for k in steps:
        for name in names:
            if f"{name}_{k}" not in rows[0]:
                continue
            a = auc_with_interval(rows, f"{name}_{k}", 1.0, outcome="present")
            within = within_prompt_auc(rows, f"{name}_{k}")
            print(f"| {k} | {name} | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {within:.3f} |")


if __name__ == "__main__":
    main()

"""Does keeping each object's pixels off the other objects' words bind colours? (issue 29, a probe on seen data.)

    python benchmarks/region_binding_probe.py [--model unet] [--category seen_triples] [--prompts 16] [--seeds 8]

The model's own cross-attention says where each object forms from step 2 on (BENCHMARKS.md, issue 28's locator
table). So: read each object's instance words over the first `--read` fraction of the steps; from then on, each
pixel whose object is clear (its normalised map the largest and at least `--threshold`) attends to no word of
another object's phrase (arm `phrases`), and also to no end-of-text or padding token, which carry every colour of the
prompt (arm `phrases+end`). Every arm on the plain arm's noise; rows to OUT/ARM.csv (an arm with a file is not run
again); the table to OUT/results.md."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from probe_rows import arm_rows, fixed_broken

import attnctl
from attnctl.control import Controller
from attnctl.eval import build_suite, mcnemar, sample_seed, score_case
from attnctl.layout import Layout
from attnctl.models import load_pipeline, sampling_defaults

MODELS = {"mmdit": "builtin:shapes-mmdit", "unet": "builtin:shapes-unet"}


class RegionBinding(Controller):
    def __init__(self, prompt, phrases, read=0.2, threshold=0.3, block_end=False):
        self.layout = Layout.from_dict({"prompt": prompt, "background": "", "regions": [
            {"phrase": p, "box": [i / len(phrases), 0, (i + 1) / len(phrases), 1]} for i, p in enumerate(phrases)]})
        self.read, self.threshold, self.block_end = read, threshold, block_end

    def attach(self, session):
        bound = self.layout.bind(session.prompts[0], "rules")
        self.instances = [r.instance for r in bound.regions]
        self.phrases = [r.phrase for r in bound.regions]
        self.end = session.prompts[0].end_of_text
        self.maps, self.labels = {}, {}

    def wants(self, site):
        return site.kind in ("cross", "joint")

    def begin_run(self):
        self.maps, self.labels = {}, {}

    def __call__(self, call):
        step, rows = call.step, call.step.cond_rows
        if rows.stop == rows.start:
            return
        last_read = max(1, round(self.read * step.num_steps)) - 1
        if step.index <= last_read:
            probs = call.text_probs()[rows].mean(dim=1)  # (images, image tokens, text)
            maps = torch.stack([probs[..., i].sum(-1) for i in self.instances], 1).unflatten(-1, call.grid)
            g = tuple(call.grid)
            self.maps[g] = maps if g not in self.maps else self.maps[g] + maps
            return
        labels = self._labels(tuple(call.grid))  # (images, image tokens), 0 = no object
        n_text = call.text.stop - call.text.start
        blocked = torch.zeros(labels.shape[0], labels.shape[1], n_text, dtype=torch.bool)
        for r in range(1, len(self.phrases) + 1):
            others = [p for j, ph in enumerate(self.phrases, start=1) if j != r for p in ph if p < n_text]
            if self.block_end and self.end is not None:
                others += list(range(self.end, n_text))
            blocked[:, :, others] |= (labels == r)[:, :, None]
        q = call.q[rows][:, :, call.image].float()
        k, v = call.k[rows].float(), call.v[rows].float()
        scores = (q @ k.transpose(-1, -2)) * call.scale
        bias = torch.zeros(scores.shape[0], 1, scores.shape[2], scores.shape[3])
        bias[..., call.text] = bias[..., call.text].masked_fill(blocked[:, None], float("-inf"))
        if call.key_bias is not None:
            bias = bias + call.key_bias[rows]
        out = torch.softmax(scores + bias, dim=-1) @ v
        full = call.output().clone()
        full[rows.start:rows.stop, :, call.image] = out.to(full.dtype)
        call.set_output(full)

    def _labels(self, grid):
        if grid not in self.labels:
            maps = sum(F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in self.maps.values())
            norm = maps / maps.flatten(2).amax(-1)[..., None, None].clamp_min(1e-12)
            top, which = norm.max(dim=1)
            self.labels[grid] = torch.where(top >= self.threshold, which + 1, 0).flatten(1)
        return self.labels[grid]


def run_arm(pipe, arm, cases, seeds, sampling, args):
    rows = []
    for n, case in enumerate(cases):
        gens = [torch.Generator().manual_seed(sample_seed(case, s)) for s in seeds]
        kw = dict(num_inference_steps=sampling.get("num_inference_steps", 25),
                  guidance_scale=sampling.get("guidance_scale", 5.0), generator=gens,
                  num_images_per_prompt=len(seeds))
        if arm == "plain":
            images = pipe(case.prompt, **kw).images
        else:
            method = RegionBinding(case.prompt, case.phrases, args.read, args.threshold, block_end=arm.endswith("end"))
            with attnctl.apply(pipe, method, prompt=case.prompt) as session:
                images = session(case.prompt, **kw).images
        for seed, image in zip(seeds, images):
            s = score_case(case, image)
            rows.append({"arm": arm, "prompt": case.prompt, "seed": seed, "present": int(s["present"]),
                         "bound": int(s["bound"])})
        print(f"{arm} {n + 1}/{len(cases)}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=MODELS, default="unet")
    parser.add_argument("--category", default="seen_triples")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--read", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--arms", default="plain,phrases,phrases+end")
    parser.add_argument("--out", type=Path, default=Path("out/region-binding"))
    args = parser.parse_args()
    model = MODELS[args.model]
    out = args.out / f"{args.model}-{args.category}"
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cases = [c for c in build_suite(args.prompts) if args.category in c.categories]
    seeds = list(range(args.seeds))
    results = {}
    for arm in args.arms.split(","):
        path = out / f"{arm}-r{args.read}-t{args.threshold}.csv" if arm != "plain" else out / "plain.csv"
        results[path.stem] = arm_rows(path, lambda arm=arm: run_arm(pipe, arm, cases, seeds, sampling_defaults(model),
                                                                     args))
    plain = results["plain"]
    lines = ["| arm | bound | present | fixed | broken | p |", "|---|---|---|---|---|---|"]
    for arm, rows in results.items():
        bound = sum(int(r["bound"]) for r in rows.values())
        present = sum(int(r["present"]) for r in rows.values())
        fixed, broken = fixed_broken(rows, plain, "bound")
        lines.append(f"| {arm} | {bound}/{len(rows)} | {present}/{len(rows)} | {fixed} | {broken} | "
                     f"{mcnemar(fixed, broken):.3g} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

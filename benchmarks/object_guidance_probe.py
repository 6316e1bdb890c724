"""Does guidance toward each object raise presence? (issues 28/29: a probe on seen data.)

    python benchmarks/object_guidance_probe.py [--model mmdit] [--category seen_triples] [--prompts 16] [--seeds 4]
        [--arm NAME=mode:all,scale:1,until:0.4 ...]

On the MMDiT every failure of pairs and triples is a missing shape, and neither its attention nor its early
prediction foresees which (BENCHMARKS.md, issue 29). This probe does not predict: it pushes every object's
contribution to the prediction, at every step of an early window. With c the conditional prediction and w_i the
prediction for the prompt without object i (the contrast locator's counterfactual), the conditional half becomes

    all:      c + scale · Σ_i (c − w_i)               (every object's own contribution made stronger)
    weakest:  c + scale · (c − w_k), k the object whose contrast ‖c − w_k‖ is smallest over the image (per image)
    swap:     c + scale · Σ_π (c − s_π), s_π the prediction for the prompt with its colours deranged by π
              (guidance away from each wrong binding)
    weakest+swap: both pushes added

before classifier-free guidance mixes it with the unconditional half, for the steps before `until` × steps. Every arm
runs on the plain arm's noise; rows per arm in OUT/<arm>.csv (read back on a rerun), paired with plain (McNemar).
The hook on the denoiser's forward is the probe's own device, not how a method attaches."""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

import torch
from contrast_locator_probe import call_of, without
from probe_rows import append_rows, fixed_broken

from attnctl.eval import build_suite, mcnemar, score_case
from attnctl.models import load_pipeline, sampling_defaults

MODELS = {"mmdit": "builtin:shapes-mmdit", "unet": "builtin:shapes-unet"}


def encode(pipe, prompt: str, n: int) -> dict:
    """The denoiser's text inputs for `prompt`, `n` rows, without classifier-free guidance."""
    if hasattr(pipe, "transformer"):
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, prompt_3=prompt, device="cpu",
                                              num_images_per_prompt=n, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": pe, "pooled_projections": pooled}
    pe, _ = pipe.encode_prompt(prompt, "cpu", n, False)
    return {"encoder_hidden_states": pe}


class ObjectGuidance:
    """The probe's forward hook on the denoiser (see the module's docstring)."""

    def __init__(self, pipe, mode: str, scale: float, until: float, swap_scale: float | None = None):
        self.pipe, self.mode, self.scale, self.until = pipe, mode, scale, until
        self.swap_scale = scale if swap_scale is None else swap_scale
        self.withouts: list[dict] = []
        self.step = 0
        self.inside = False
        self.steps = 25

    def start(self, case, n: int, steps: int) -> None:
        texts = [without(case.prompt, ph) for ph in case.phrases] if self.mode != "swap" else []
        self.objects = len(texts)
        texts += swapped(case) if self.mode in ("swap", "weakest+swap") else []
        self.withouts = [encode(self.pipe, text, n) for text in texts]
        self.step, self.steps = 0, steps

    def __call__(self, module, args, kwargs, output):
        if self.inside:
            return output
        index, self.step = self.step, self.step + 1
        if index >= round(self.until * self.steps):
            return output
        pred = output[0]
        n = pred.shape[0] // 2
        sample = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))[n:]
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        timestep = timestep[n:] if timestep.dim() else timestep
        cond = pred[n:]
        self.inside = True
        try:
            with torch.no_grad():
                key = "hidden_states" if hasattr(self.pipe, "transformer") else "sample"
                others = [module(**{key: sample, "timestep": timestep, **w, "return_dict": False})[0]
                          for w in self.withouts]
        finally:
            self.inside = False
        diffs = torch.stack([cond - o for o in others], 1)  # (images, objects, ...)
        if self.mode in ("all", "swap"):
            push = diffs.sum(1)
        else:
            strength = diffs[:, :self.objects].flatten(2).norm(dim=2)  # (images, objects)
            push = diffs[torch.arange(n), strength.argmin(1)] + \
                self.swap_scale / self.scale * diffs[:, self.objects:].sum(1)
        return (torch.cat([pred[:n], cond + self.scale * push]),) + tuple(output[1:])


def swapped(case) -> list[str]:
    """The case's prompt with its colours moved to other objects' shapes, once per derangement (1 for a pair, 2 for
    a triple)."""
    colours = [c for c, _ in case.objects]
    texts = []
    for order in itertools.permutations(range(len(colours))):
        if any(i == j for i, j in enumerate(order)):
            continue
        text = case.prompt
        for i, (colour, shape) in enumerate(case.objects):
            text = text.replace(f"{colour} {shape}", f"@{i}@", 1)
        for i, (_, shape) in enumerate(case.objects):
            text = text.replace(f"@{i}@", f"{colours[order[i]]} {shape}")
        texts.append(text)
    return texts


def parse_arm(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    opts = dict(kv.split(":") for kv in spec.split(",") if kv)
    return name, {"mode": opts.get("mode", "all"), "scale": float(opts.get("scale", 1.0)),
                  "until": float(opts.get("until", 0.4)),
                  "swap_scale": float(opts["swap"]) if "swap" in opts else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mmdit")
    parser.add_argument("--category", choices=("seen_pairs", "seen_triples"), default="seen_triples")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--arm", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("out/object-guidance"))
    args = parser.parse_args()
    model = MODELS[args.model]
    out = args.out / f"{args.model}-{args.category}"
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in build_suite(args.prompts) if c.categories == (args.category,)]
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    sampling = sampling_defaults(model)
    steps = sampling.get("num_inference_steps", 25)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    seeds = list(range(args.seeds))
    arms = [("plain", None)] + [parse_arm(a) for a in args.arm]
    results = {}
    for name, opts in arms:
        path = out / f"{name}.csv"
        done = set()
        if path.exists():
            done = {r["prompt"] for r in csv.DictReader(path.open())}
        guidance = ObjectGuidance(pipe, **opts) if opts else None
        handle = denoiser.register_forward_hook(guidance, with_kwargs=True) if guidance else None
        began = time.perf_counter()
        made = 0
        try:
            for case in cases:
                if case.prompt in done:
                    continue
                if guidance:
                    guidance.start(case, len(seeds), steps)
                images = pipe(case.prompt, **call_of(case, seeds, sampling)).images
                made += len(images)
                rows = []
                for seed, image in zip(seeds, images):
                    s = score_case(case, image)
                    rows.append({"prompt": case.prompt, "seed": seed, "present": int(s["present"]),
                                 "bound": int(s["bound"])})
                append_rows(path, rows)
        finally:
            if handle:
                handle.remove()
        results[name] = ({(r["prompt"], r["seed"]): r for r in csv.DictReader(path.open())},
                         (time.perf_counter() - began) / made if made else None)
        print(f"{name} done", flush=True)
    plain = results["plain"][0]
    print(f"\n{model}, {args.category}, {len(plain)} samples per arm\n")
    print("| arm | every object present | all bound | fixed / broken (bound), p | s per image |")
    print("|---|---|---|---|---|")
    for name, (rows, sec) in results.items():
        present = sum(int(r["present"]) for r in rows.values()) / len(rows)
        bound = sum(int(r["bound"]) for r in rows.values()) / len(rows)
        f, b = fixed_broken(rows, plain, "bound")
        timing = f"{sec:.2f}" if sec else "(read back)"
        print(f"| {name} | {present:.3f} | {bound:.3f} | {f} / {b}, {mcnemar(f, b):.3g} | {timing} |")


if __name__ == "__main__":
    main()

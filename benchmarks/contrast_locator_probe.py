"""Where does an object form, by the model's own denoising rather than its attention? (issue 28, a probe on seen data.)

    python benchmarks/contrast_locator_probe.py [--model mmdit] [--prompts 16] [--seeds 4] [--read 0.32]

The MMDiT's image→text attention does not say where its objects are (BENCHMARKS.md, the locator table), so
relocation cannot place them there. This probe locates object i by contrast: the latents after the first k steps of
the prompt, against the latents after k steps of the prompt without object i's phrase, from the same noise; where the
two differ most is where object i is forming. Then relocation's window search and permutation move each object onto
its box at the end of step k, and the run goes on. Arms: plain, contrast (this locator + relocation's move).
Placed = every object present and inside its box (the suite's scorer, used only to judge). Rows to OUT/ARM.csv."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from probe_rows import arm_rows, fixed_broken

from attnctl.eval import build_suite, mcnemar, sample_seed, score_case
from attnctl.methods.relocation import box_cells, cell_permutation, centred_window, object_windows
from attnctl.models import load_pipeline, sampling_defaults

MODELS = {"mmdit": "builtin:shapes-mmdit", "unet": "builtin:shapes-unet"}


class Stop(Exception):
    pass


def without(prompt: str, phrase: str) -> str:
    """The prompt with `phrase` and one connector beside it removed."""
    connector = r"(,\s*and\s+|\s+and\s+|,\s*)"
    for pattern in (re.escape(phrase) + connector, connector + re.escape(phrase)):
        edited, n = re.subn(pattern, "", prompt, count=1)
        if n:
            return edited.strip()
    return prompt.replace(phrase, "").strip()


def latents_after(pipe, prompt, k, kw):
    """The latents at the end of step k."""
    got = {}

    def cb(p, i, t, x):
        if i == k:
            got["x"] = x["latents"].clone()
            raise Stop
        return {}
    try:
        pipe(prompt, **kw, callback_on_step_end=cb, output_type="latent")
    except Stop:
        pass
    return got["x"]


def cells_of(x):
    return x.flatten(2).transpose(1, 2)  # (images, cells, channels)


def prediction(pipe, x, t, prompt):
    """The transformer's conditional prediction at latents x and scheduler timestep t for `prompt` (SD3-like)."""
    pe, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, prompt_3=prompt, device="cpu",
                                          num_images_per_prompt=x.shape[0], do_classifier_free_guidance=False)
    return pipe.transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=pe,
                            pooled_projections=pooled, return_dict=False)[0]


def call_of(case, seeds, sampling) -> dict:
    """The pipeline call's arguments for `case`: one image per seed, each seed's own generator."""
    return dict(num_inference_steps=sampling.get("num_inference_steps", 25),
                guidance_scale=sampling.get("guidance_scale", 5.0), num_images_per_prompt=len(seeds),
                generator=[torch.Generator().manual_seed(sample_seed(case, s)) for s in seeds])


def moved(z, maps, case, window):
    """The latents `z` with each image's object windows (found in `maps`) moved onto the case's boxes."""
    h, w = z.shape[-2:]
    boxes = [centred_window(box_cells(b, (h, w)), window, (h, w)) for b in case.boxes]
    cells = cells_of(z)
    out = cells.clone()
    for j in range(cells.shape[0]):
        out[j] = cells[j, cell_permutation(object_windows(maps[j], boxes), boxes, (h, w))]
    return out.transpose(1, 2).reshape(z.shape)


def read_step(args, sampling) -> int:
    return max(1, round(args.read * sampling.get("num_inference_steps", 25))) - 1


def run_onestep(pipe, case, seeds, sampling, args, window):
    """The same move, located by one step's counterfactual: at the latents after step k, the prediction for the
    prompt against that for the prompt without object i."""
    k = read_step(args, sampling)

    def cb(p, i, t, x):
        if i != k:
            return {}
        z = x["latents"]
        t_next = p.scheduler.timesteps[k + 1]
        with torch.no_grad():
            full = prediction(p, z, t_next, case.prompt)
            maps = torch.stack([(full - prediction(p, z, t_next, without(case.prompt, ph))).norm(dim=1)
                                for ph in case.phrases], 1)
        return {"latents": moved(z, maps, case, window)}
    return pipe(case.prompt, **call_of(case, seeds, sampling), callback_on_step_end=cb).images


def run_case(pipe, case, seeds, sampling, args, window):
    k = read_step(args, sampling)
    full = latents_after(pipe, case.prompt, k, call_of(case, seeds, sampling))
    maps = torch.stack([(full - latents_after(pipe, without(case.prompt, ph), k, call_of(case, seeds, sampling)))
                        .norm(dim=1) for ph in case.phrases], 1)  # (images, objects, h, w)
    start = moved(full, maps, case, window)

    def cb(p, i, t, x):
        return {"latents": start} if i == k else {}
    return pipe(case.prompt, **call_of(case, seeds, sampling), callback_on_step_end=cb).images


def run_arm(pipe, arm, cases, seeds, sampling, args) -> list[dict]:
    """Each case's images of one arm, scored."""
    rows = []
    for n, case in enumerate(cases):
        if arm == "plain":
            images = pipe(case.prompt, **call_of(case, seeds, sampling)).images
        else:
            run = run_onestep if args.onestep else run_case
            images = run(pipe, case, seeds, sampling, args, args.window)
        for seed, image in zip(seeds, images):
            s = score_case(case, image)
            rows.append({"prompt": case.prompt, "seed": seed, "present": int(s["present"]),
                         "placed": int(s["present"] and s["inside"]), "bound": int(s["bound"])})
        print(f"{arm} {n + 1}/{len(cases)}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=MODELS, default="mmdit")
    parser.add_argument("--category", default="seen_placed_pairs")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--read", type=float, default=0.32)
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--onestep", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/contrast"))
    args = parser.parse_args()
    model = MODELS[args.model]
    out = args.out / f"{args.model}-{args.category}"
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    sampling = sampling_defaults(model)
    cases = [c for c in build_suite(args.prompts) if args.category in c.categories]
    seeds = list(range(args.seeds))
    results = {}
    kind = "onestep" if args.onestep else "contrast"
    for arm in ("plain", f"{kind}-r{args.read}-w{args.window}"):
        results[arm] = arm_rows(out / f"{arm}.csv", lambda arm=arm: run_arm(pipe, arm, cases, seeds, sampling, args))
    plain = results["plain"]
    lines = ["| arm | placed | present | fixed | broken | p |", "|---|---|---|---|---|---|"]
    for arm, rows in results.items():
        placed = sum(int(r["placed"]) for r in rows.values())
        present = sum(int(r["present"]) for r in rows.values())
        fixed, broken = fixed_broken(rows, plain, "placed")
        lines.append(f"| {arm} | {placed}/{len(rows)} | {present}/{len(rows)} | {fixed} | {broken} | "
                     f"{mcnemar(fixed, broken):.3g} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

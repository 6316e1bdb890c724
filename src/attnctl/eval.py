"""`attnctl eval --suite shapes`: the methods compared on held-out shapes-world prompts, scored exactly.

Categories (every prompt uses object pairs never seen together in training, or triples, which training never has):
- two_objects:    "a red circle and a blue square" — success: both shapes are there (any colour);
- colour_binding: the same images — success: both shapes are there, each in its own colour;
- three_objects:  "a red circle and a blue square and a green triangle" — success: all three bound;
- layout:         "a red circle to the left of a blue square" — success: both bound, each mostly inside its region
                  (the half of the image the relation names; AST is given those regions as its layout).
Each (prompt, seed) is one sample; rates come with 95% Wilson intervals. Regulation selects its best iterate per
image (`selection="image"`), which is what the reference does at its only batch size, 1, while letting us batch seeds.
With several processes (`accelerate launch -m attnctl.cli eval ...`), prompts are split between them.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_STEPS, QUICK_STEPS, DEFAULT_GUIDANCE = 25, 10, 5.0
CATEGORIES = ("two_objects", "colour_binding", "three_objects", "layout")
HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
          "bottom": (0.0, 0.5, 1.0, 1.0)}
THIRDS = [(0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0)]
RELATION_SIDES = {"to the left of": ("left", "right"), "to the right of": ("right", "left"),
                  "above": ("top", "bottom"), "below": ("bottom", "top")}


@dataclass
class Case:
    """One prompt of the suite, with the truth to score it against and the layout AST is given."""

    categories: tuple[str, ...]
    prompt: str
    objects: list[tuple[str, str]]
    boxes: list[tuple[float, float, float, float]]
    relation: str | None = None
    phrases: list[str] = field(default_factory=list)


def build_suite(prompts_per_category: int, rng_seed: int = 0) -> list[Case]:
    from .shapes import data

    rng = random.Random(rng_seed)
    pairs = [(a, b) for a, b in itertools.permutations(data.ALL_OBJECTS, 2)
             if data.is_heldout_pair(a, b) and a[0] != b[0] and a[1] != b[1]]
    rng.shuffle(pairs)
    cases = []
    for a, b in pairs[:prompts_per_category]:
        cases.append(Case(("two_objects", "colour_binding"), f"a {a[0]} {a[1]} and a {b[0]} {b[1]}", [a, b],
                          [HALVES["left"], HALVES["right"]]))
    relations = list(RELATION_SIDES)
    for k, (a, b) in enumerate(pairs[:prompts_per_category]):
        rel = relations[k % len(relations)]
        sides = RELATION_SIDES[rel]
        cases.append(Case(("layout",), f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}", [a, b],
                          [HALVES[sides[0]], HALVES[sides[1]]], relation=rel))
    triples = [t for t in itertools.permutations(data.ALL_OBJECTS, 3)
               if len({o[0] for o in t}) == 3 and len({o[1] for o in t}) == 3]
    rng.shuffle(triples)
    for t in triples[:prompts_per_category]:
        cases.append(Case(("three_objects",), " and ".join(f"a {c} {s}" for c, s in t), list(t), list(THIRDS)))
    for case in cases:
        case.phrases = [f"a {c} {s}" for c, s in case.objects]
    return cases


def score_case(case: Case, image) -> dict[str, bool | float]:
    """Per-category success of one image, plus the details behind it."""
    from .shapes.scorer import relation_holds, score_image

    scored = score_image(image, [(c, s, box) for (c, s), box in zip(case.objects, case.boxes)])
    objs = scored.objects
    present = all(o.present for o in objs)
    bound = all(o.bound for o in objs)
    inside = all(bool(o.inside) for o in objs)
    relation = case.relation is None or relation_holds(objs[0], objs[1], case.relation)
    success = {"two_objects": present, "colour_binding": bound, "three_objects": bound,
               "layout": bound and inside and relation}
    return {"success": {c: success[c] for c in case.categories}, "present": present, "bound": bound,
            "inside": inside, "relation": relation, "mean_iou": float(np.mean([o.iou or 0.0 for o in objs])),
            "count": scored.count}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Rate and its 95% Wilson score interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


# --- methods ----------------------------------------------------------------------------------------------------

def controllers_for(method: str, case: Case) -> list:
    if method == "none":
        return []
    if method == "regulation":
        from .methods.regulation import Regulation

        return [Regulation(targets=[s for _, s in case.objects], selection="image")]
    if method == "ast":
        from .layout import Layout
        from .methods.ast import AST

        layout = Layout.from_dict({"prompt": case.prompt, "background": "", "regions": [
            {"phrase": phrase, "box": list(box)} for phrase, box in zip(case.phrases, case.boxes)]})
        return [AST(layout)]
    raise ValueError(method)


def run_suite(methods: list[tuple[str, str]], cases: list[Case], seeds: list[int], steps: int, guidance: float,
              device: str = "cpu", progress: bool = True) -> list[dict]:
    """Generate and score every (method, case, seed). `methods` are (method, model spec) pairs."""
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .control import apply
    from .models import load_pipeline

    state = PartialState()
    rows = []
    for method, model in methods:
        pipe = load_pipeline(model, device=device if state.num_processes == 1 else state.device)
        pipe.set_progress_bar_config(disable=True)
        with state.split_between_processes(list(range(len(cases)))) as mine:
            for i in tqdm(mine, desc=f"{method} on {model}", disable=not progress or not state.is_main_process):
                case = cases[i]
                generators = [torch.Generator().manual_seed(1000 * s + i) for s in seeds]
                with apply(pipe, *controllers_for(method, case), prompt=case.prompt):
                    images = pipe(case.prompt, num_images_per_prompt=len(seeds), generator=generators,
                                  num_inference_steps=steps, guidance_scale=guidance, output_type="pil").images
                for seed, image in zip(seeds, images):
                    s = score_case(case, image)
                    for category, ok in s["success"].items():
                        rows.append({"method": method, "model": model, "category": category, "prompt": case.prompt,
                                     "seed": seed, "success": int(ok), "present": int(s["present"]),
                                     "bound": int(s["bound"]), "inside": int(s["inside"]),
                                     "relation": int(s["relation"]), "mean_iou": round(s["mean_iou"], 4),
                                     "count": s["count"]})
    return _gather(rows, state)


def _gather(rows: list[dict], state) -> list[dict]:
    if state.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return [row for part in gather_object([rows]) for row in part]


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for row in rows:
        key = (f"{row['method']} ({row['model'].split(':')[-1]})", row["category"])
        s, n = summary.get(key, (0, 0))
        summary[key] = (s + row["success"], n + 1)
    out = {}
    for (label, category), (s, n) in summary.items():
        rate, lo, hi = wilson(s, n)
        out.setdefault(label, {})[category] = {"rate": rate, "ci95": [lo, hi], "n": n, "successes": s}
    return out


def write_results(rows: list[dict], summary: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Shapes-world evaluation. Command: `{command}`", "",
             "| method (model) | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for label, cats in summary.items():
        cells = []
        for c in CATEGORIES:
            r = cats.get(c)
            cells.append("—" if r is None else f"{r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Success rate [95% Wilson interval] (samples = prompts x seeds). See attnctl/eval.py for what "
              "counts as success in each category."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    from .viz import eval_figure

    eval_figure(summary, CATEGORIES, out / "results.png")

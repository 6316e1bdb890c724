"""`attnctl eval --suite shapes`: the methods compared on shapes-world prompts, scored exactly, with what each
method does to attention measured on the same samples.

Categories (every prompt but the seen pairs and single objects uses combinations never shown together in training):
- single_objects: "a red circle" (the base model's control, only when asked for) — success: the object bound;
- seen_pairs:     "a red circle and a blue square" with a pair trained on (the control) — success: both bound;
- two_objects:    "a red circle and a blue square", a held-out pair — success: both shapes are there (any colour);
- colour_binding: the same images — success: both shapes are there, each in its own colour;
- three_objects:  "a red circle and a blue square and a green triangle", never together in training — success: all
                  three bound;
- layout:         "a red circle to the left of a blue square" — success: both bound, each mostly inside its region
                  (the half of the image the relation names; AST is given those regions as its layout).
- placed_pairs, placed_triples: a held-out pair or triple ("a red circle and a blue square") with a random layout of
                  boxes whose left-to-right order is not the word order — success: placed, every object present and
                  mostly inside its own box;
- seen_placed_pairs, seen_placed_triples: the same with seen pairs and triples (not run by default): the split on
                  which a layout method's options are chosen, so that the held-out layouts stay held out;
- seen_triples:   three objects shown together in training (not run by default) — success: all three bound; where a
                  binding method's options are chosen (the seen pairs are bound too often to tell options apart).
In the layout categories every arm is judged against the same boxes (the plain model too), and each method arm is
paired with the plain arm on the same samples (fixed, broken, exact McNemar p). A sample's starting noise comes from
the case's identity and the seed (`sample_seed`), so a run of some categories draws the images of the full run.
Methods: every method of the registry, each on the built-in model it is declared for (layout methods get each case's
boxes as their layout). Each arm's wall time per
image is recorded, and its ratio to the plain arm on the same model (the arms run one after another in one process).
Each (prompt, seed) is one sample; rates come with 95% Wilson intervals. Regulation selects its best iterate per
image (`selection="image"`), which is what the reference does at its only batch size, 1, while letting us batch seeds.
With several processes (`accelerate launch -m attnctl.cli eval ...`), prompts are split between them.

Attention, per sample, beside the image: on the UNet model each target's coverage (the 90th-percentile probability
Regulation optimises, at the layers it edits, every step; `analysis.TargetCoverage`) and the balance between targets;
on the MMDiT model the share of the instance and attribute words' attention inside their regions (the hierarchy
analysis, every joint site and step).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .relations import HALVES, boxes_from_prompt, strips

log = logging.getLogger(__name__)

DEFAULT_STEPS, QUICK_STEPS, DEFAULT_GUIDANCE = 25, 10, 5.0
HELDOUT_CATEGORIES = ("two_objects", "colour_binding", "three_objects", "layout", "placed_pairs", "placed_triples")
CATEGORIES = ("single_objects", "seen_pairs", *HELDOUT_CATEGORIES, "seen_placed_pairs", "seen_placed_triples",
              "seen_triples")
DEFAULT_CATEGORIES = ("seen_pairs", *HELDOUT_CATEGORIES)
# judged by where the objects are (every arm's images against the same boxes)
LAYOUT_CATEGORIES = ("layout", "placed_pairs", "placed_triples", "seen_placed_pairs", "seen_placed_triples")
RANDOM_BOX_SIDE = (0.4, 0.5)  # a random layout's box sides, as fractions of the image (objects are drawn 0.2-0.38)
ATTENTION = ("q90_min", "q90_mean", "balance", "share_instance", "share_attribute")
RELATIONS = ("to the left of", "to the right of", "above", "below")  # the layout category's, in turn


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
    """`prompts_per_category` prompts of each category (fewer where fewer exist), in a fixed random order."""
    from .shapes import data

    rng = random.Random(rng_seed)
    distinct = [(a, b) for a, b in itertools.permutations(data.ALL_OBJECTS, 2) if a[0] != b[0] and a[1] != b[1]]
    held = [p for p in distinct if data.is_heldout_pair(*p)]
    seen = [p for p in distinct if not data.is_heldout_pair(*p)]
    rng.shuffle(held)
    rng.shuffle(seen)
    pair_prompt = lambda a, b: f"a {a[0]} {a[1]} and a {b[0]} {b[1]}"  # noqa: E731
    cases = [Case(("two_objects", "colour_binding"), pair_prompt(a, b), [a, b], [HALVES["left"], HALVES["right"]])
             for a, b in held[:prompts_per_category]]
    for k, (a, b) in enumerate(held[:prompts_per_category]):  # the layout the prompt states (`--auto-layout`'s)
        rel = RELATIONS[k % len(RELATIONS)]
        prompt = f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}"
        cases.append(Case(("layout",), prompt, [a, b], [box for _, box in boxes_from_prompt(prompt)], relation=rel))
    triples = [t for t in itertools.permutations(data.ALL_OBJECTS, 3)
               if len({o[0] for o in t}) == 3 and len({o[1] for o in t}) == 3 and data.is_heldout_triple(t)]
    seen_triples = [t for t in itertools.permutations(data.ALL_OBJECTS, 3)
                    if len({o[0] for o in t}) == 3 and len({o[1] for o in t}) == 3 and not data.is_heldout_triple(t)]
    rng.shuffle(triples)
    random.Random(f"seen triples {rng_seed}").shuffle(seen_triples)  # its own draw: the other categories' stay
    for category, objects in (("three_objects", triples), ("seen_triples", seen_triples)):
        for t in objects[:prompts_per_category]:
            cases.append(Case((category,), " and ".join(f"a {c} {s}" for c, s in t), list(t),
                              strips(3, "left to right")))
    for category, objects in (("placed_pairs", held[:prompts_per_category]),
                              ("placed_triples", triples[:prompts_per_category]),
                              ("seen_placed_pairs", seen[:prompts_per_category]),
                              ("seen_placed_triples", seen_triples[:prompts_per_category])):
        for objs in objects:
            prompt = " and ".join(f"a {c} {s}" for c, s in objs)
            cases.append(Case((category,), prompt, list(objs), random_layout(len(objs), random.Random(prompt))))
    cases += [Case(("seen_pairs",), pair_prompt(a, b), [a, b], [HALVES["left"], HALVES["right"]])
              for a, b in seen[:prompts_per_category]]
    singles = list(data.ALL_OBJECTS)
    rng.shuffle(singles)
    cases += [Case(("single_objects",), f"a {c} {s}", [(c, s)], [(0.0, 0.0, 1.0, 1.0)])
              for c, s in singles[:prompts_per_category]]
    for case in cases:
        case.phrases = [f"a {c} {s}" for c, s in case.objects]
    return cases


def random_layout(n: int, rng: random.Random) -> list[tuple[float, float, float, float]]:
    """`n` boxes at random places, apart from each other, in an order that is not the left-to-right order of their
    centres: a model's habit of drawing the first-named object on the left cannot pass for placement."""
    while True:
        boxes = []
        for _ in range(n):
            w, h = rng.uniform(*RANDOM_BOX_SIDE), rng.uniform(*RANDOM_BOX_SIDE)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            boxes.append((round(x, 3), round(y, 3), round(x + w, 3), round(y + h, 3)))
        apart = all(a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                    for a, b in itertools.combinations(boxes, 2))
        centres = [b[0] + b[2] for b in boxes]
        if apart and centres != sorted(centres):
            return boxes


def score_case(case: Case, image) -> dict[str, bool | float]:
    """Per-category success of one image, plus the details behind it."""
    from .shapes.scorer import relation_holds, score_image

    scored = score_image(image, [(c, s, box) for (c, s), box in zip(case.objects, case.boxes)])
    objs = scored.objects
    present = all(o.present for o in objs)
    bound = all(o.bound for o in objs)
    inside = all(bool(o.inside) for o in objs)
    relation = case.relation is None or relation_holds(objs[0], objs[1], case.relation)
    success = {"single_objects": bound, "seen_pairs": bound, "two_objects": present, "colour_binding": bound,
               "three_objects": bound, "layout": bound and inside and relation, "placed_pairs": present and inside,
               "placed_triples": present and inside, "seen_placed_pairs": present and inside,
               "seen_placed_triples": present and inside, "seen_triples": bound}
    return {"success": {c: success[c] for c in case.categories}, "present": present, "bound": bound,
            "inside": inside, "relation": relation, "mean_iou": float(np.mean([o.iou or 0.0 for o in objs])),
            "count": scored.count}


def sample_seed(case: Case, seed: int) -> int:
    """The generator seed of one sample, from the case's identity (its prompt and boxes) and the seed number: a run of
    some categories draws the same images for a case as the full run does."""
    return zlib.crc32(f"{case.prompt}|{case.boxes}".encode()) * 1000 + seed


def mcnemar(fixed: int, broken: int) -> float:
    """The exact two-sided McNemar p-value of paired samples, from the discordant pairs: `fixed` (the plain model
    failed, the method succeeded) and `broken` (the reverse)."""
    n = fixed + broken
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2**n) if n else 1.0


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Rate and its 95% Wilson score interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


# --- methods ---------------------------------------------------------------------------------------------------

@dataclass
class Arm:
    """One column of the comparison: a method (none, regulation, ast) with options on a model."""

    method: str
    model: str
    options: dict = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        self.label = self.label or f"{self.method} ({self.model.split(':')[-1]})"


def request_for(arm: Arm, case: Case, seeds: list[int], steps: int, guidance: float, device: str):
    """The `run.Request` of one case of one arm: the case's samples (one image per sample seed, each as it would come
    alone), its shape words as targets or its boxes as the layout, the arm's options over the model's
    recommendations."""
    from .methods.registry import PLAIN, layout_methods
    from .run import Request
    from .sampling import SamplingConfig

    layout = case_layout(case) if arm.method in layout_methods() else None
    return Request(method=arm.method, prompt=case.prompt, layout=layout,
                   targets=None if layout is not None or arm.method == PLAIN else [s for _, s in case.objects],
                   options=dict(arm.options),
                   model=arm.model, sampling=SamplingConfig(steps=steps, guidance=guidance, device=device),
                   seeds=[sample_seed(case, s) for s in seeds])


def case_layout(case: Case):
    """The case's boxes as a `Layout` on its prompt: one region per object, with the object's phrase."""
    from .layout import Layout

    return Layout.from_dict({"prompt": case.prompt, "background": "", "regions": [
        {"phrase": phrase, "box": list(box)} for phrase, box in zip(case.phrases, case.boxes)]})


def observers_for(arm: Arm, case: Case, pipe) -> list:
    """What measures attention on this model: target coverage at Regulation's layers (UNet models), the hierarchy
    analysis (joint attention)."""
    from .analysis import Hierarchy, TargetCoverage
    from .control import sites_of
    from .methods.regulation import RegulationConfig, edited_sites
    from .models import recommended_options

    sites = sites_of(pipe)
    if any(s.kind == "cross" for s in sites):
        options = {**recommended_options(arm.model, "regulation"),
                   **(arm.options if arm.method == "regulation" else {})}
        names = edited_sites(RegulationConfig(layers=options.get("layers")), sites)
        return [TargetCoverage([s for _, s in case.objects], sites=lambda site: site.name in names)]
    return [Hierarchy(case_layout(case), role_parser="rules")]


def attention_columns(observers, n_images: int) -> list[dict]:
    """Per image: the attention measurements of `observers_for` (NaN where not measured)."""
    from .analysis import Hierarchy, TargetCoverage

    columns = [dict.fromkeys(ATTENTION, float("nan")) for _ in range(n_images)]
    for observer in observers:
        if isinstance(observer, TargetCoverage):
            coverage, balance = observer.per_image(), observer.balance()
            for i, row in enumerate(columns):
                row.update(q90_min=float(coverage[i].min()), q90_mean=float(coverage[i].mean()),
                           balance=float(balance[i]))
        elif isinstance(observer, Hierarchy):  # the rows of all images together: one value per case
            for role in ("instance", "attribute"):
                shares = [r["share"] for r in observer.rows if r["role"] == role and not math.isnan(r["share"])]
                for row in columns:
                    row[f"share_{role}"] = float(np.mean(shares)) if shares else float("nan")
    return columns


def run_suite(arms: list[Arm], cases: list[Case], seeds: list[int], steps: int | None = None,
              guidance: float | None = None, device: str = "cpu", progress: bool | None = None,
              measure: bool = True, checkpoint: Path | None = None) -> list[dict]:
    """Generate and score every (arm, case, seed), with the attention measurements when `measure`; a progress bar
    per arm unless `progress` is False (default: unless ATTNCTL_PROGRESS=0). `steps` and `guidance` default to what
    each arm's model recommends (its `attnctl.json`), else DEFAULT_STEPS and DEFAULT_GUIDANCE.

    `checkpoint`: a folder where each case's rows are appended as it finishes (`rows-<process>.jsonl`); a case
    found there with the same arm, options, sampling and seeds is not generated again, so a run that was stopped
    resumes where it stopped. Its rows keep the seconds of the run that made them."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .models import _show_progress, sampling_defaults
    from .run import Pipelines, generate

    progress = _show_progress() if progress is None else progress
    state = PartialState()
    device = device if state.num_processes == 1 else str(state.device)
    rows = []
    pipelines = Pipelines(keep=len(arms))
    done = _checkpointed(checkpoint)
    resumed = 0
    warm: set[str] = set()
    for arm in arms:
        recommended = sampling_defaults(arm.model)
        arm_steps = steps if steps is not None else recommended.get("num_inference_steps", DEFAULT_STEPS)
        arm_guidance = guidance if guidance is not None else recommended.get("guidance_scale", DEFAULT_GUIDANCE)
        requests = [request_for(arm, case, seeds, arm_steps, arm_guidance, device) for case in cases]
        keys = [_case_key(arm, case, request, measure) for case, request in zip(cases, requests)]
        with state.split_between_processes(list(range(len(cases)))) as mine:
            todo = [i for i in mine if keys[i] not in done]
            rows += [row for i in mine if keys[i] in done for row in done[keys[i]]]
            resumed += len(mine) - len(todo)
            if not todo:  # nothing to generate: the model is not even loaded
                continue
            pipe = pipelines.get(arm.model, requests[0].sampling)
            if arm.model not in warm:
                warm.add(arm.model)
                pipe.set_progress_bar_config(disable=True)
                # one untimed call first: one-time costs (allocator, lazy initialisation) must not count for the
                # first arm
                pipe(prompt=cases[0].prompt, num_inference_steps=1, guidance_scale=arm_guidance, output_type="latent")
            for i in tqdm(todo, desc=arm.label, disable=not progress or not state.is_main_process):
                case = cases[i]
                observers = observers_for(arm, case, pipe) if measure else []
                output = generate(requests[i], pipelines, observers=observers)
                images, seconds = output.images, output.seconds
                attention = attention_columns(observers, len(images))
                case_rows = []
                for seed, image, measured in zip(seeds, images, attention):
                    s = score_case(case, image)
                    for category, ok in s["success"].items():
                        case_rows.append({"method": arm.label, "model": arm.model, "category": category,
                                          "prompt": case.prompt, "seed": seed, "success": int(ok),
                                          "present": int(s["present"]), "bound": int(s["bound"]),
                                          "inside": int(s["inside"]), "placed": int(s["present"] and s["inside"]),
                                          "relation": int(s["relation"]),
                                          "mean_iou": round(s["mean_iou"], 4), "count": s["count"],
                                          "seconds": round(seconds, 4), "steps": arm_steps, "guidance": arm_guidance,
                                          **{k: round(v, 5) for k, v in measured.items()}})
                rows += case_rows
                if checkpoint is not None:  # made at the first case written: nothing before the model loads
                    checkpoint.mkdir(parents=True, exist_ok=True)
                    with (checkpoint / f"rows-{state.process_index}.jsonl").open("a") as journal:
                        # a newline first: a line a stop cut short stays a line of its own, skipped when read
                        journal.write("\n" + json.dumps({"key": keys[i], "rows": case_rows}) + "\n")
    if resumed:
        log.info("%d of %d cases read from the checkpoint %s", resumed, len(arms) * len(cases), checkpoint)
    return _gather(rows, state)


def _case_key(arm: Arm, case: Case, request, measure: bool) -> str:
    """What decides a case's rows: the arm (method, model, options, and the model's recommendation for the method
    where it has one: a changed recommendation makes new rows), the case, its sample seeds and sampling."""
    from .models import recommended_options

    sampling = request.sampling
    key = {"arm": arm.label, "method": arm.method, "model": arm.model, "options": arm.options,
           "prompt": case.prompt, "categories": case.categories, "boxes": case.boxes,
           "seeds": request.seeds, "steps": sampling.steps, "guidance": sampling.guidance,
           "device": sampling.device, "measure": measure}
    recommended = recommended_options(arm.model, arm.method)
    if recommended:  # (absent otherwise, so the rows of arms without one stay valid)
        key["recommended"] = recommended
    return json.dumps(key, sort_keys=True, default=str)


def _checkpointed(checkpoint: Path | None) -> dict[str, list[dict]]:
    """The rows of the cases a checkpoint folder holds, by case key (a line cut by a stop is skipped)."""
    done: dict[str, list[dict]] = {}
    for path in sorted(checkpoint.glob("rows-*.jsonl")) if checkpoint is not None and checkpoint.is_dir() else ():
        for line in filter(None, path.read_text().splitlines()):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["key"]] = entry["rows"]
    return done


def _gather(rows: list[dict], state) -> list[dict]:
    if state.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return [row for part in gather_object([rows]) for row in part]


def summarize(rows: list[dict]) -> dict:
    """Per arm and category: the success rate with its 95% Wilson interval, the placed rate (every object present
    and inside its own box) where the category has a layout, the mean of each attention measurement with a 95%
    normal interval, and `paired`: the samples paired with the plain arm on the same model (`paired_with_plain`)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["method"], {}).setdefault(row["category"], []).append(row)
    out: dict = {}
    for label, categories in groups.items():
        for category, members in categories.items():
            s, n = sum(r["success"] for r in members), len(members)
            rate, lo, hi = wilson(s, n)
            entry = {"rate": rate, "ci95": [lo, hi], "n": n, "successes": s}
            if category in LAYOUT_CATEGORIES and all("placed" in r for r in members):
                placed = sum(r["placed"] for r in members)
                entry["placed"] = {"rate": placed / n, "ci95": list(wilson(placed, n)[1:]), "successes": placed}
            for key in ATTENTION:
                values = [r[key] for r in members if key in r and not math.isnan(r[key])]
                if values:
                    mean, half = float(np.mean(values)), 1.96 * float(np.std(values)) / math.sqrt(len(values))
                    entry[key] = {"mean": mean, "ci95": [mean - half, mean + half]}
            out.setdefault(label, {})[category] = entry
    for (label, category), pairs in paired_with_plain(rows).items():
        out[label][category]["paired"] = pairs
    return out


def _is_plain(label: str) -> bool:
    return label.startswith("none (")


def paired_with_plain(rows: list[dict], column: str = "success") -> dict[tuple[str, str], dict]:
    """Per (method arm, category): its samples matched with the plain arm's on the same model by prompt and seed
    (the same starting noise): n, both rates, `fixed` (plain failed, the method succeeded), `broken` (the reverse)
    and the exact McNemar p. Arms with no plain arm on their model are left out."""
    plain: dict = {}
    for row in rows:
        if _is_plain(row["method"]):
            plain[(row["model"], row["category"], row["prompt"], row["seed"])] = row[column]
    tallies: dict = {}
    for row in rows:
        key = (row["model"], row["category"], row["prompt"], row["seed"])
        if _is_plain(row["method"]) or key not in plain:
            continue
        t = tallies.setdefault((row["method"], row["category"]), {"n": 0, "method": 0, "plain": 0, "fixed": 0,
                                                                   "broken": 0})
        got, base = row[column], plain[key]
        t["n"] += 1
        t["method"] += got
        t["plain"] += base
        t["fixed"] += int(got > base)
        t["broken"] += int(got < base)
    return {key: {"n": t["n"], "rate": t["method"] / t["n"], "plain_rate": t["plain"] / t["n"], "fixed": t["fixed"],
                  "broken": t["broken"], "mcnemar_p": mcnemar(t["fixed"], t["broken"])}
            for key, t in tallies.items()}


def time_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per arm: mean seconds per image (over its distinct samples) and the ratio to the plain arm on its model (None
    when the run has no plain arm on that model)."""
    seconds: dict[str, dict] = {}
    for row in rows:
        if "seconds" in row:
            seconds.setdefault(row["method"], {"model": row["model"], "samples": {}})["samples"][
                (row["prompt"], row["seed"])] = row["seconds"]
    means = {label: (entry["model"], float(np.mean(list(entry["samples"].values())))) for label, entry in
             seconds.items()}
    plain = {model: mean for label, (model, mean) in means.items() if _is_plain(label)}
    return {label: {"seconds": mean, "ratio": mean / plain[model] if model in plain else None}
            for label, (model, mean) in means.items()}


def write_rows(rows: list[dict], path: Path) -> None:
    """The samples' rows as CSV, one column per key of the first row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_results(rows: list[dict], summary: dict, out: Path, command: str) -> None:
    """results.csv (the rows), results.md (success rates with 95% intervals, the paired, attention and timing tables,
    quoting `command`) and results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "results.csv")
    categories = [c for c in CATEGORIES if any(c in cats for cats in summary.values())]
    lines = [f"Shapes-world evaluation. Command: `{command}`", "",
             "| method (model) | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for label, cats in summary.items():
        cells = []
        for c in categories:
            r = cats.get(c)
            cells.append("—" if r is None else f"{r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sampling = {row["method"]: f"{row['steps']} steps, guidance {row['guidance']:g}" for row in rows}
    lines += ["", "Success rate [95% Wilson interval] (samples = prompts x seeds). See attnctl/eval.py for what "
              "counts as success in each category. Sampling: "
              + "; ".join(f"{label} {how}" for label, how in sampling.items()) + ".", ""]
    lines += paired_table(summary) + attention_table(summary)
    timing = time_ratios(rows)
    if timing:
        lines += ["", "| method (model) | seconds per image | time vs plain |", "|---|---|---|"]
        lines += [f"| {label} | {t['seconds']:.3f} | " + ("—" if t["ratio"] is None else f"{t['ratio']:.2f}×") + " |"
                  for label, t in timing.items()]
        lines += ["", "Wall time per image, the arms run one after another in this process (a ratio is only as "
                  "steady as the machine was)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    from .viz import eval_figure

    models = ", ".join(dict.fromkeys(Path(row["model"].split(":")[-1]).name for row in rows))
    samples = len({(row["method"], row["prompt"], row["seed"]) for row in rows})
    eval_figure(summary, categories, out / "results.png", title=f"Shapes world: {samples} images on {models}")


def paired_table(summary: dict) -> list[str]:
    """Markdown rows: each method against the plain model on the same samples (fixed, broken, exact McNemar p), and
    the placed rate of every arm where a category has a layout; none when there is nothing to show."""
    lines = []
    paired = [(label, c, r["paired"]) for label, cats in summary.items() for c, r in cats.items() if "paired" in r]
    if paired:
        lines += ["| method (model) | category | method | plain | fixed | broken | exact McNemar p |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {label} | {c} | {p['rate']:.3f} | {p['plain_rate']:.3f} | {p['fixed']} | {p['broken']} | "
                  f"{p['mcnemar_p']:.3g} |" for label, c, p in paired]
        lines += ["", "Paired with the plain model on the same prompts and seeds (the same starting noise): fixed = "
                  "samples the plain model failed and the method got right, broken = the reverse.", ""]
    placed = [(label, c, r["placed"]) for label, cats in summary.items() for c, r in cats.items() if "placed" in r]
    if placed:
        lines += ["| method (model) | category | placed |", "|---|---|---|"]
        lines += [f"| {label} | {c} | {p['rate']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] |"
                  for label, c, p in placed]
        lines += ["", "Placed: every object present and the larger part of each inside its own box (the plain "
                  "model's images judged against the same boxes).", ""]
    return lines


def attention_table(summary: dict) -> list[str]:
    """Markdown rows: per arm and category, the mean attention measurements [95% interval]; none when nothing was
    measured."""
    if not any(k in r for cats in summary.values() for r in cats.values() for k in ATTENTION):
        return []
    lines = ["| method (model) | category | " + " | ".join(ATTENTION) + " |", "|---|---|" + "---|" * len(ATTENTION)]
    for label, cats in summary.items():
        for c in CATEGORIES:
            r = cats.get(c)
            if r is None or not any(k in r for k in ATTENTION):
                continue
            cells = [f"{r[k]['mean']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]" if k in r else "—"
                     for k in ATTENTION]
            lines.append(f"| {label} | {c} | " + " | ".join(cells) + " |")
    return lines + ["", "Attention per sample (mean [95% interval]): q90 = a target's 90th-percentile attention at "
                    "Regulation's layers (min and mean over the targets), balance = weakest / strongest target; "
                    "share = the fraction of the instance / attribute words' attention inside their regions."]


def dose_arms(method: str, model: str, strengths: list[float], options: dict | None = None) -> list[Arm]:
    """One arm per strength of `method` (0 is the plain model), with the method's other `options`."""
    return [Arm(method, model, {**(options or {}), "strength": s}, label=f"{method} ×{s:g}") for s in strengths]


def write_dose(summary: dict, strengths: list[float], method: str, out: Path, command: str) -> None:
    """dose.md (success per category and strength) and dose.png (the curves with their intervals)."""
    out.mkdir(parents=True, exist_ok=True)
    categories = [c for c in CATEGORIES if any(c in cats for cats in summary.values())]
    lines = [f"Dose-response of {method}. Command: `{command}`", "",
             "| strength | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for strength, (_label, cats) in zip(strengths, summary.items()):
        cells = [f"{cats[c]['rate']:.3f} [{cats[c]['ci95'][0]:.3f}, {cats[c]['ci95'][1]:.3f}]" if c in cats else "—"
                 for c in categories]
        lines.append(f"| {strength:g} | " + " | ".join(cells) + " |")
    (out / "dose.md").write_text("\n".join(lines) + "\n")
    from .viz import dose_figure

    dose_figure(summary, strengths, categories, f"{method}: success vs strength (0 = plain)", out / "dose.png")

"""Choosing a method's options for a model on its seen split (`attnctl tune`): each candidate of a small grid over the
method's declared config fields runs on the seen prompts, paired with the plain model on the same samples; the best
candidate becomes the model's recommendation (its folder's `attnctl.json`, which every front end reads). Held-out
prompts are never looked at in the choice (`attnctl tune --heldout` measures the choice on them afterwards,
separately).

Only a shapes-world model has a seen split (its folder holds `shapes_training.json`, written by `attnctl shapes
train`): the exact scorer judges the samples."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .config import build, cli_fields
from .errors import UsageError
from .methods.registry import PLAIN, Method

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64


@dataclass
class Candidate:
    """One point of the grid and how it did on the seen samples, paired with the plain model."""

    options: dict
    rate: float
    plain_rate: float
    fixed: int
    broken: int
    mcnemar_p: float
    n: int


def model_folder(model: str) -> Path:
    """The folder of a shapes-world model (built-in or trained), whose samples the exact scorer can judge."""
    from .models import model_dir

    folder = model_dir(model)
    if not (folder / "shapes_training.json").is_file():
        raise UsageError(f"tune chooses options on a shapes-world model's seen split, and {model!r} is not one (no "
                         "shapes_training.json): use builtin:shapes-unet, builtin:shapes-mmdit or a folder written "
                         "by attnctl shapes train")
    return folder


def grid_candidates(method: Method, grid: dict[str, list]) -> list[dict]:
    """Every combination of `grid` (field name -> values), each checked by the method's config; a UsageError for a
    field the config does not declare, a bad value, or a grid too large."""
    fields = {f.name for f in cli_fields(method.config)} - {"targets"}
    unknown = sorted(set(grid) - fields)
    if unknown:
        raise UsageError(f"{method.name} has no option {', '.join(unknown)}; its options are "
                         f"{', '.join(sorted(fields))}")
    names = list(grid)
    combos = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    if not combos or len(combos) > MAX_CANDIDATES:
        raise UsageError(f"the grid has {len(combos)} candidates; give between 1 and {MAX_CANDIDATES}")
    for options in combos:
        build(method.config, None, **options)  # a value out of its bounds fails here, before any model loads
    return combos


def seen_categories(method: Method, categories: str | list[str] | None) -> list[str]:
    """`categories` (a list or comma-separated; default: the method's seen category), each checked to be a category
    of seen prompts."""
    from .config import comma_list
    from .eval import CATEGORIES

    seen = [c for c in CATEGORIES if c.startswith("seen_")]
    chosen = comma_list(categories) if isinstance(categories, str) else list(categories or [method.seen_category])
    for category in chosen:
        if category not in seen:
            raise UsageError(f"tune chooses on seen prompts only, and {category!r} is not a seen category; give one "
                             f"or more of {', '.join(seen)} (--category)")
    return chosen


def tune(method: Method, model: str, grid: dict[str, list], prompts: int, seeds: int,
         steps: int | None = None, device: str = "cpu",
         categories: list[str] | None = None) -> tuple[list[Candidate], list[dict]]:
    """Every candidate of `grid` on seen splits of `model` (`categories`, default the method's; several are pooled:
    each candidate's samples of all of them, paired with the plain model's), paired with the plain model; returns the
    candidates (best first: highest rate, then fewest broken, then the order given) and all rows."""
    from .eval import Arm, build_suite, paired_with_plain, run_suite

    categories = seen_categories(method, categories)
    model_folder(model)
    combos = grid_candidates(method, grid)
    cases = [c for c in build_suite(prompts) if set(categories) & set(c.categories)]
    labels = [f"{method.name} #{i + 1}" for i in range(len(combos))]
    arms = [Arm(PLAIN, model)] + [Arm(method.name, model, options, label=label)
                                  for options, label in zip(combos, labels)]
    rows = run_suite(arms, cases, list(range(seeds)), steps=steps, device=device, measure=False)
    pooled = "+".join(categories)
    pairs = paired_with_plain([{**r, "category": pooled} for r in rows if r["category"] in categories])
    found = []
    for options, label in zip(combos, labels):
        p = pairs[(label, pooled)]
        found.append(Candidate(options, p["rate"], p["plain_rate"], p["fixed"], p["broken"], p["mcnemar_p"],
                               p["n"]))
    order = sorted(range(len(found)), key=lambda i: (-found[i].rate, found[i].broken, i))
    return [found[i] for i in order], rows


def write_recommendation(model: str, method: Method, options: dict) -> Path:
    """`options` as the model's recommendation for `method` in its folder's attnctl.json, over the recommendation it
    had (the candidates ran with it under their options; other keys kept)."""
    path = model_folder(model) / "attnctl.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    methods = settings.setdefault("methods", {})
    methods[method.name] = {**methods.get(method.name, {}), **{k: _plain(v) for k, v in options.items()}}
    path.write_text(json.dumps(settings) + "\n")
    log.info("wrote %s's recommendation for %s to %s", method.name, model, path)
    return path


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def table(candidates: list[Candidate], category: str) -> list[str]:
    """Markdown rows of the candidates, best first."""
    lines = [f"| options | {category} | plain | fixed | broken | exact McNemar p | n |",
             "|---|---|---|---|---|---|---|"]
    for c in candidates:
        shown = ", ".join(f"{k}={v}" for k, v in c.options.items())
        lines.append(f"| {shown} | {c.rate:.3f} | {c.plain_rate:.3f} | {c.fixed} | {c.broken} | {c.mcnemar_p:.3g} | "
                     f"{c.n} |")
    return lines



"""The hierarchy analysis behind AST: per attention block and step, how much of each token role's attention falls
inside its region.

For a layout (regions with phrases, a background phrase) and each role — instance words, attribute words, background
words (`attnctl.roles`) — the observer takes the image→text probabilities actually used at every site and step
(conditional rows, mean over heads), and for every region r the attention mass the image gives to r's tokens of that
role, A_r(p) = Σ_{j ∈ tokens(r, role)} P[p, j]. Then

    share(role) = Σ_r Σ_{p ∈ region r} A_r(p) / Σ_r Σ_p A_r(p)

the fraction of the role's attention that lands where the layout puts it (1 = all of it, the area of the regions =
what spatially uniform attention would give). Also recorded: `area` (that uniform baseline) and `mass` (the mean
probability a pixel gives to the role's tokens: which role dominates a block). The paper's observation is that on
FLUX instance words localise in early blocks, background words in middle ones and attribute words late; the curves
over depth show whether a model (any model: joint or cross attention) behaves so.

    hierarchy = Hierarchy(layout)
    with attnctl.apply(pipe, hierarchy):                      # optionally with AST(layout) too
        pipe(layout.prompt, ...)
    hierarchy.write_csv("hierarchy.csv"); hierarchy.plot("hierarchy.png")
"""

from __future__ import annotations

import csv
import numbers
from collections import defaultdict

import torch

from .config import step_indices, word_list
from .control import AttentionCall, Controller
from .errors import UsageError
from .layout import Layout, load_layout
from .roles import ATTRIBUTE, BACKGROUND, INSTANCE, ROLES
from .roles import PARSERS as ROLE_PARSERS
from .tokens import HeldWords


class TargetCoverage(Controller):
    """Observer of what Attention Regulation optimises: per image, each target word's attention coverage — the
    `quantile` (0.9) of its probability over the pixels (its sub-tokens summed, mean over heads) — averaged over the
    recorded sites and steps. `balance()` is the weakest target's coverage over the strongest's (1 = even).

        coverage = TargetCoverage(["cat", "dog"], sites=lambda site: site.stage == "down_blocks.2")
        with attnctl.apply(pipe, coverage, prompt="a cat and a dog"):
            pipe("a cat and a dog")
        coverage.per_image()      # (images, words)
    """

    observer = True
    handles_key_mask = True  # reads text_probs(), which honour the key mask

    def __init__(self, words, sites=None, steps=None, quantile: float = 0.9):
        self.words = word_list(words, "TargetCoverage's words")
        if not self.words:
            raise UsageError("TargetCoverage needs at least one word of the prompt")
        if sites is not None and not callable(sites):
            raise UsageError(f"TargetCoverage's sites is a predicate on a site (lambda site: ...), not {sites!r}")
        self.site_filter = sites
        self.steps = None if steps is None else set(step_indices(steps, "TargetCoverage's steps"))
        if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 <= quantile <= 1:
            raise UsageError(f"TargetCoverage's quantile must be a number from 0 to 1, not {quantile!r}")
        self.quantile = float(quantile)

    def attach(self, session) -> None:
        """Finds the token positions of the words in each prompt and starts the sums afresh."""
        if not session.prompts:
            raise UsageError("TargetCoverage needs the prompt: pass prompt=... to attnctl.apply")
        self._positions = HeldWords(session.prompts, [self.words] * len(session.prompts))
        self.sums: torch.Tensor | None = None
        self.count = 0

    def wants(self, site) -> bool:
        """Every site, or those the `sites` predicate accepts."""
        return self.site_filter is None or self.site_filter(site)

    def __call__(self, call: AttentionCall) -> None:
        rows = call.step.cond_rows
        if rows.stop <= rows.start or (self.steps is not None and call.step.index not in self.steps):
            return
        probs = call.text_probs()[rows].mean(dim=1).float()  # (rows, image tokens, text tokens)
        n_text = probs.shape[-1]
        values = torch.stack([
            torch.stack([probs[r][:, positions].sum(-1) for positions in
                         self._positions(call.step.prompt_of_row(r), n_text)])
            for r in range(probs.shape[0])])  # (rows, words, image tokens)
        coverage = torch.quantile(values, self.quantile, dim=-1).double().cpu()
        self.sums = coverage if self.sums is None else self.sums + coverage
        self.count += 1

    def per_image(self) -> torch.Tensor:
        """(images, words): mean coverage over the recorded calls."""
        if self.sums is None:
            raise UsageError("TargetCoverage recorded nothing: check its sites and steps")
        return self.sums / self.count

    def balance(self) -> torch.Tensor:
        """(images,): the weakest target's coverage over the strongest's."""
        per_image = self.per_image()
        return per_image.min(dim=1).values / per_image.max(dim=1).values.clamp_min(1e-12)


COLUMNS = ("step", "timestep", "block", "site", "stage", "depth", "role", "share", "area", "mass")


class Hierarchy(Controller):
    """Observer recording, per site and step, each token role's in-region share of attention (see the module doc;
    docs/methods.md §4). `steps`: step indices to record (all if None); `role_parser`: auto, spacy or rules.

        hierarchy = Hierarchy("examples/two_animals.json")
        with attnctl.apply(pipe, hierarchy):
            pipe(hierarchy.prompt)
        hierarchy.write_csv("hierarchy.csv"); hierarchy.plot("hierarchy.png")
    """

    observer = True
    handles_key_mask = True  # reads text_probs(), which honour the key mask

    def __init__(self, layout, steps=None, role_parser: str = "auto"):
        self.layout: Layout = load_layout(layout)
        self.prompt = self.layout.prompt
        self.steps = None if steps is None else set(step_indices(steps, "the hierarchy's steps"))
        if not isinstance(role_parser, str) or role_parser not in ROLE_PARSERS:
            raise UsageError(f"role_parser must be one of {', '.join(ROLE_PARSERS)}, not {role_parser!r}")
        self.role_parser = role_parser
        self.rows: list[dict] = []

    def attach(self, session) -> None:
        """Binds the layout to each prompt's tokens (each region's instance and attribute tokens, the background's)
        and clears the rows."""
        if not session.prompts:
            raise UsageError("the hierarchy analysis needs the prompt: pass prompt=... to attnctl.apply")
        self.prompts = session.prompts
        self.bound = [self.layout.bind(p, self.role_parser) for p in session.prompts]
        self._held: dict[tuple, list[int]] = {}
        self.rows = []

    def _positions(self, prompt: int, role: str, region: int, positions: list[int], n_text: int) -> list[int]:
        """The role's tokens that a text sequence of `n_text` tokens holds; tokens cut by the sequence limit are left
        out with a logged warning (`PromptTokens.held`), once per prompt, role, region and length."""
        key = (prompt, role, region, n_text)
        if key not in self._held:
            where = self.layout.regions[region - 1].phrase if region else "the background"
            self._held[key] = self.prompts[prompt].held(f"{role} tokens of {where}", positions, n_text,
                                                        requested=False)
        return self._held[key]

    def __call__(self, call: AttentionCall) -> None:
        step = call.step
        rows = step.cond_rows
        if rows.stop <= rows.start or (self.steps is not None and step.index not in self.steps):
            return
        probs = call.text_probs()[rows].mean(dim=1)  # (cond rows, image tokens, text tokens)
        n_text = probs.shape[-1]
        labels = self.layout.labels(call.grid).flatten().to(probs.device)
        n_img = labels.numel()
        per_role = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))  # inside, total, area·total
        for b in range(probs.shape[0]):
            prompt = min(step.prompt_of_row(b), len(self.bound) - 1)
            bound = self.bound[prompt]
            groups = [(INSTANCE, r + 1, t.instance) for r, t in enumerate(bound.regions)]
            groups += [(ATTRIBUTE, r + 1, t.attribute) for r, t in enumerate(bound.regions)]
            groups.append((BACKGROUND, 0, bound.background))
            for role, region, positions in groups:
                positions = self._positions(prompt, role, region, positions, n_text)
                if not positions:
                    continue
                mass = probs[b][:, positions].sum(-1).double()  # (image tokens,)
                inside = labels == region
                total = mass.sum()
                acc = per_role[role]
                acc[0] += mass[inside].sum()
                acc[1] += total
                acc[2] += total * inside.double().mean()
        for role in ROLES:
            if role not in per_role:
                continue
            inside, total, area = per_role[role].tolist()
            pixels = n_img * probs.shape[0]
            self.rows.append({
                "step": step.index, "timestep": round(float(step.timestep), 3), "block": call.site.block,
                "site": call.site.name, "stage": call.site.stage, "depth": round(call.site.depth, 6), "role": role,
                "share": inside / total if total > 0 else float("nan"),
                "area": area / total if total > 0 else float("nan"),
                "mass": total / pixels,
            })

    # --- results ----------------------------------------------------------------------------------------------
    def by_depth(self) -> dict[str, list[tuple[float, float, float, float]]]:
        """Per role: (depth, mean share over steps, mean area, mean mass), one entry per site, by depth."""
        acc: dict = defaultdict(lambda: defaultdict(list))
        for r in self.rows:
            acc[r["role"]][r["depth"]].append((r["share"], r["area"], r["mass"]))
        out = {}
        for role, sites in acc.items():
            out[role] = [(d, *(sum(v[i] for v in vals) / len(vals) for i in range(3)))
                         for d, vals in sorted(sites.items())]
        return out

    def write_csv(self, path) -> None:
        """The recorded rows as a CSV file at `path`, one per site, step and role (`COLUMNS`), floats to 6 decimals."""
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})

    def plot(self, path, title: str | None = None) -> None:
        """The share curves (top) and mean attention per pixel (bottom) over depth, as a PNG."""
        from .viz import hierarchy_figure

        hierarchy_figure(self.by_depth(), path, title or f"attention hierarchy: {self.layout.prompt}")

"""Per-word attention maps: image→text probabilities of chosen words at every site and step.

The probabilities come from the attention's row log-sum-exp (one fused pass, the one that computes the output) and
one small matmul of the conditional rows' image queries with the words' keys: nothing is computed for the
unconditional rows or for the text tokens no word uses (`AttentionCall.kept_text_probs`). A word's map is the sum
over its sub-tokens of the probability a pixel gives to them (so it stays in [0, 1]); maps are averaged over heads and
over the captured steps, per site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import build, check, comma_list, option, step_indices, word_list
from ..control import AttentionCall, Controller
from ..errors import UsageError
from ..tokens import HeldWords


def parse_steps(text: str) -> list[int]:
    """'0-9' or '0,5,10' -> step indices."""
    steps = []
    try:
        for part in text.split(","):
            a, sep, b = part.partition("-")
            steps += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise UsageError(f"steps {text!r}: write steps as 0-9 or 0,5,10") from None
    return steps


@dataclass
class CaptureConfig:
    """What `Capture` records (docs/methods.md §3)."""

    words: list = option([], "words of the prompt to map (word#2 for a repeat)", parse=comma_list)
    steps: list | None = option(None, "step indices to average, e.g. 0-9 or 0,5,10", parse=parse_steps,
                                flag="map-steps", shown_default="every step")
    sites: object = option(None, "site names, or a predicate on a site", cli=False, shown_default="every site")

    def __post_init__(self):
        check(self)
        self.words = word_list(self.words, "words")
        if not self.words:
            raise UsageError("name at least one word of the prompt to capture maps for (words=[...] or --words)")
        if self.steps is not None:
            self.steps = step_indices(parse_steps(self.steps) if isinstance(self.steps, str) else self.steps,
                                      "steps (--map-steps)")
        if not (self.sites is None or callable(self.sites) or (isinstance(self.sites, (list, tuple, set, frozenset))
                                                               and all(isinstance(s, str) for s in self.sites))):
            raise UsageError(f"sites must be a list of site names or a predicate on a site (lambda site: ...), not "
                             f"{self.sites!r}")


class Capture(Controller):
    """Per-word attention maps at every site and step: `Capture(words, config=None, **options)` with the fields of
    `CaptureConfig`.

        capture = Capture(["cat", "dog"], steps=range(10))
        with attnctl.apply(pipe, capture, prompt="a cat and a dog"):
            pipe("a cat and a dog")
        capture.maps()      # {site: (images, words, h, w)}

    A word that the pipeline cuts from the prompt (a `max_sequence_length` too short for it) is a UsageError naming
    it; with `requested=False` (words chosen automatically) it is a logged warning, and its map is left empty.
    """

    observer = True
    handles_key_mask = True  # reads text_probs(), which honour the key mask

    def __init__(self, words=None, config: CaptureConfig | None = None, requested: bool = True, **options):
        if words is not None:
            options["words"] = words
        if not isinstance(requested, bool):
            raise UsageError(f"requested must be true or false, not {requested!r}")
        self.config = build(CaptureConfig, config, **options)
        self.words = self.config.words
        self.requested = requested
        self.steps = None if self.config.steps is None else set(self.config.steps)
        self.site_filter = self.config.sites
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.grids: dict[str, tuple[int, int]] = {}
        self.site_info: dict[str, object] = {}

    def attach(self, session):
        """Finds the token positions of the words in each prompt; refuses a session without the prompt."""
        if not session.prompts:
            raise UsageError("Capture needs the prompt: pass prompt=... to attnctl.apply")
        self._positions = HeldWords(session.prompts, [self.words] * len(session.prompts), self.requested)
        self._selectors: dict[tuple, torch.Tensor] = {}

    def wants(self, site):
        """Every site, or those the `sites` option names or accepts."""
        f = self.site_filter
        return f is None or (f(site) if callable(f) else site.name in f)

    def _selector(self, prompts: tuple[int, ...], n_text: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, selector): the text positions any word uses, in order, and (rows, columns, words) which of them
        make up each word for each conditional row's prompt; built once per (prompts, text length, device), so a
        call copies nothing to the device."""
        key = (prompts, n_text, str(device))
        if key not in self._selectors:
            words = [self._positions(prompt, n_text) for prompt in prompts]
            columns = sorted({p for row in words for positions in row for p in positions})
            where = {p: i for i, p in enumerate(columns)}
            sel = torch.zeros(len(prompts), len(columns), len(self.words))
            for r, row in enumerate(words):
                for j, positions in enumerate(row):
                    sel[r, [where[p] for p in positions], j] = 1.0
            self._selectors[key] = torch.tensor(columns, dtype=torch.long).to(device), sel.to(device)
        return self._selectors[key]

    def __call__(self, call: AttentionCall) -> None:
        rows = call.step.cond_rows
        if rows.stop == rows.start or (self.steps is not None and call.step.index not in self.steps):
            return
        prompts = tuple(call.step.prompt_of_row(r) for r in range(rows.stop - rows.start))
        columns, selector = self._selector(prompts, call.k[:, :, call.text].shape[2], call.q.device)
        probs = call.kept_text_probs(rows, columns).mean(dim=1)  # (cond rows, image tokens, columns), float32
        maps = probs @ selector  # (cond rows, image tokens, words)
        maps = maps.transpose(1, 2).reshape(maps.shape[0], len(self.words), *call.grid)
        # summed on the device in float32 and read back once, by maps(): no copy or sync inside a denoising step
        name = call.site.name
        if name in self.sums and self.sums[name].shape == maps.shape:
            self.sums[name] += maps
            self.counts[name] += 1
        else:
            self.sums[name], self.counts[name] = maps, 1
        self.grids[name], self.site_info[name] = call.grid, call.site

    def maps(self) -> dict[str, torch.Tensor]:
        """Per site: (images, words, h, w) probabilities, mean over heads and captured steps, on the CPU."""
        return {name: (s / self.counts[name]).float().cpu() for name, s in self.sums.items()}

    def grouped(self, bands: int = 4) -> dict[str, torch.Tensor]:
        """Maps averaged within groups of sites: by grid size for cross-attention sites, by depth band for joint
        sites; each group at its largest grid. Keys are display labels."""
        groups: dict[str, list[torch.Tensor]] = {}
        for name, m in self.maps().items():
            site = self.site_info[name]
            if site.kind == "cross":
                label = "x".join(map(str, self.grids[name]))
            else:
                band = min(int(site.depth * bands), bands - 1)
                label = f"depth {band / bands:.2f}-{(band + 1) / bands:.2f}"
            groups.setdefault(label, []).append(m)
        out = {}
        for label, ms in groups.items():
            size = max((m.shape[-2:] for m in ms), key=lambda s: s[0] * s[1])
            out[label] = torch.stack([F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
                                      if tuple(m.shape[-2:]) != tuple(size) else m for m in ms]).mean(0)
        # largest grid first (UNet resolutions), then by label (depth bands in order)
        return dict(sorted(out.items(), key=lambda kv: (-kv[1].shape[-2] * kv[1].shape[-1], kv[0])))


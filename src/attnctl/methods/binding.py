"""Attribute binding: SynGen's loss (Rassin et al., NeurIPS 2023, arXiv 2306.08877) as an attnctl controller, with
Attend-and-Excite's presence term beside it.

    with attnctl.apply(pipe, Binding(), prompt="a red circle and a blue square") as session:
        image = session("a red circle and a blue square", generator=generator).images[0]

Each noun of the prompt that has modifiers ("a *red* circle") forms a group. At each of the first denoising steps
the latents move down the gradient of `binding_math.syngen_loss`, which pulls each modifier's attention map onto its
noun's and pushes both off the rest of the prompt, plus `presence` × Attend-and-Excite's loss on the groups' nouns
(the most neglected noun's 1 − smoothed maximum), so that binding one object is not paid for by losing another.
Why SynGen's formulation and not Conform's: it is defined on the same per-token maps and latent update as
Attend-and-Excite (which attnctl already runs exactly), has no temperature to choose, and its public code fixes every
constant. Its defaults are SynGen's (step size 20, constant; the first 25 steps; the 16×16 maps); the presence
weight is attnctl's (docs/methods.md §7). The move: `latent_guidance`. On MMDiTs the maps are the image→text part of
every joint-attention block (an attnctl extension: SynGen is defined on the SD 1.x UNet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import build, check, comma_list, option
from ..errors import UsageError
from ..roles import PARSERS, binding_groups
from ..text import phrase_spans
from ..text import words as split_words
from .binding_math import GroupPositions, presence_loss, syngen_loss
from .latent_guidance import LatentGuidance
from .targets import one_target_list

log = logging.getLogger(__name__)


@dataclass
class BindingConfig:
    """Every option of the binding method (docs/methods.md §7). The defaults are SynGen's, but for `presence`.

        Binding(step_size=10.0, presence=1.0)     # or config=BindingConfig(...)
    """

    targets: list | None = option(None, "the nouns whose modifiers are bound to them (each must have a modifier in "
                                  "the prompt); None: every noun that has one", parse=comma_list, flag="--targets",
                                  shown_default="every noun with a modifier")
    groups: list | None = option(None, "the groups explicitly, each a verbatim part of the prompt whose last word is "
                                 "the noun and the others its modifiers, such as 'red circle,blue square' (where "
                                 "the parser does not find them: 'a circle that is red' -> 'red circle' is not "
                                 "verbatim, so write the prompt 'a red circle')", parse=comma_list,
                                 shown_default="parsed from the prompt")
    step_size: float = option(20.0, "how far the latents move down the gradient at each step (constant)", low=0)
    max_iter_to_alter: int = option(25, "move the latents at the first N denoising steps", low=0, high=10_000)
    presence: float = option(1.0, "weight of Attend-and-Excite's presence loss on the groups' nouns (0: SynGen's "
                             "loss alone)", low=0, high=1000)
    parser: str = option("auto", "how groups are found: spaCy's parse, the built-in rules, or spaCy when installed",
                         choices=PARSERS)
    resolution: int | None = option(None, "side of the UNet cross-attention grid whose maps are read", parse=int,
                                    shown_default="16, or the side nearest to 16", low=1, high=1024)

    cli_prefix = "bind-"  # its flags: --bind-step-size, ...; --targets is shared

    def __post_init__(self):
        check(self)
        self.targets = one_target_list(self.targets, "the binding method")
        if self.groups is not None:
            if isinstance(self.groups, str):
                self.groups = comma_list(self.groups)
            if not isinstance(self.groups, (list, tuple)) or not self.groups or not all(
                    isinstance(g, str) and len(split_words(g)) >= 2 for g in self.groups):
                raise UsageError(f"groups (--bind-groups) must be a list of phrases of the prompt of two words or "
                                 f"more, such as ['red circle', 'blue square'], not {self.groups!r}")
            if self.targets is not None:
                raise UsageError("give the binding method either targets (nouns whose modifiers the parser finds) or "
                                 "groups, not both")


def bound_nouns(prompt: str) -> list[str]:
    """The nouns of `prompt` that have modifiers (the binding method's targets when none are named)."""
    return [g.noun[0] for g in _modified_nouns(prompt)]


def _modified_nouns(prompt: str, parser: str = "auto") -> list:
    """`binding_groups(prompt, parser)`; a UsageError naming the fix where there is none."""
    groups = binding_groups(prompt, parser)
    if not groups:
        raise UsageError(f"the binding method found no noun with a modifier in {prompt!r} (such as 'a red circle'); "
                         "name the groups with groups=['red circle', ...] (--bind-groups)")
    return groups


class Binding(LatentGuidance):
    """The binding method as a controller: `Binding(targets=None, config=None, **options)` with the fields of
    `BindingConfig`. Run the pipeline through the session (`session(prompt, ...)`). `groups` holds each prompt's
    groups as words after attach; `history` each moved step's losses."""

    name = "the binding method"
    reads = ("cross", "joint")

    def __init__(self, targets=None, config: BindingConfig | None = None, **options):
        if targets is not None:
            options["targets"] = targets
        self.config = build(BindingConfig, config, **options)
        self.history: list[dict] = []

    def setup(self, session) -> None:
        """Finds each prompt's groups (modifier words and their noun) and their token positions, and the groups' nouns
        for the presence term."""
        self.groups, self._groups, self._nouns = [], [], []
        for prompt in session.prompts:
            found = self._groups_of(prompt.prompt)
            every = sorted({p for _, start, end in prompt.words() for p in prompt.span_positions(start, end)})
            positions = []
            for modifiers, noun in found:
                spans = [self._positions(prompt, w) for w in modifiers]
                noun_at = self._positions(prompt, noun)
                inside = {p for s in [*spans, noun_at] for p in s}
                positions.append(GroupPositions(tuple(spans), noun_at, tuple(p for p in every if p not in inside)))
            self.groups.append([([w for w, _, _ in m], n[0]) for m, n in found])
            self._groups.append(positions)
            self._nouns.append(sorted({p for g in positions for p in g.noun}))
        log.debug("%s: groups %s", self.name, self.groups)

    def _groups_of(self, prompt: str):
        """[(modifier words, noun word)] of `prompt`, words as (word, start, end)."""
        if self.config.groups is not None:
            found = []
            for phrase in self.config.groups:
                spans = phrase_spans(prompt, phrase)
                if not spans:
                    raise UsageError(f"binding group {phrase!r} is not a part of the prompt {prompt!r}; name groups "
                                     "as they are written in it")
                at = spans[0][0]
                ws = [(w, at + s, at + e) for w, s, e in split_words(prompt[spans[0][0]:spans[0][1]])]
                found.append((ws[:-1], ws[-1]))
            return found
        if self.config.targets is None:
            return [(list(g.modifiers), g.noun) for g in _modified_nouns(prompt, self.config.parser)]
        groups = binding_groups(prompt, self.config.parser)
        chosen, left = [], list(groups)
        for target in self.config.targets:  # in order: "a red circle and a blue circle" binds both circles
            match = next((g for g in left if g.noun[0].lower() == target.lower()), None)
            if match is None:
                found = ", ".join(f"{' '.join(w for w, _, _ in g.modifiers)} -> {g.noun[0]}" for g in groups)
                raise UsageError(f"the binding method: no modifier found for {target!r} in {prompt!r} (groups "
                                 f"found: {found or 'none'}); write the modifier before its noun ('a red circle'), "
                                 "name the groups with groups=[...] (--bind-groups), or leave that noun out of the "
                                 "targets")
            left.remove(match)
            chosen.append((list(match.modifiers), match.noun))
        return chosen

    @staticmethod
    def _positions(prompt, word) -> tuple[int, ...]:
        found = prompt.span_positions(word[1], word[2])
        if not found:
            raise UsageError(f"the binding method: the word {word[0]!r} has no token in the text the model reads "
                             "(cut by the text encoder's length limit?)")
        return tuple(found)

    def image_loss(self, maps: torch.Tensor, prompt: int) -> torch.Tensor:
        """SynGen's loss on the groups of the image's prompt, plus `presence` × Attend-and-Excite's on their nouns."""
        loss = syngen_loss(maps, self._groups[prompt])
        if self.config.presence:
            loss = loss + self.config.presence * presence_loss(maps, self._nouns[prompt])
        return loss

    def moves_at(self, index: int) -> bool:
        """Whether `index` is one of the first `max_iter_to_alter` steps."""
        return index < self.config.max_iter_to_alter

    def step_size(self, index: int, num_steps: int) -> float:
        """The configured `step_size`, the same at every step."""
        return self.config.step_size

    def resolution(self) -> int | None:
        """The configured `resolution` (None: 16, or the side nearest to it)."""
        return self.config.resolution

"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv 2301.13826) as an attnctl controller.

    with attnctl.apply(pipe, AttendAndExcite(["cat", "dog"]), prompt=prompt) as session:
        image = session(prompt, generator=generator).images[0]      # through the session, not pipe(...)

At each of the first denoising steps, before the denoiser's step, the latents move down the gradient of a loss on
the cross-attention maps of a gradient-enabled conditional forward: the loss of the most neglected target token,
1 − its smoothed maximum attention (`attend_excite_math`). At threshold steps the move repeats until every target
reaches the step's threshold (at most `max_refinement_steps` times). The definition and its defaults are those of
diffusers' `StableDiffusionAttendAndExcitePipeline`; docs/methods.md §5 states them and what decides exactness.
How the moved latents reach the pipeline: `latent_guidance`.

Beyond the pipeline: all images of a batch in one gradient forward, with the refinement continuing only for the
images still below the threshold; the forward stops at the last site it reads; no forward at steps that cannot move
the latents; SDXL and any UNet pipeline with a step callback; targets as words (`--targets`, the prompt's nouns by
default).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..config import build, check, comma_list, default_of, flag_of, option
from ..errors import UsageError
from .attend_excite_math import max_attention_per_token, neglect_loss
from .latent_guidance import LatentGuidance
from .targets import TARGETS_HELP, normalise_targets, target_positions, targets_per_prompt

log = logging.getLogger(__name__)


def parse_thresholds(text: str) -> dict[int, float]:
    """'0:0.05,10:0.5,20:0.8' -> {0: 0.05, 10: 0.5, 20: 0.8}. A step given twice is a UsageError (one of its two
    thresholds would be dropped)."""
    pairs: list[tuple[int, float]] = []
    try:
        for part in text.split(","):
            if part.strip():
                step, _, value = part.partition(":")
                pairs.append((int(step), float(value)))
    except ValueError:
        raise UsageError(f"thresholds {text!r}: write step:threshold pairs such as 0:0.05,10:0.5,20:0.8") from None
    steps = [step for step, _ in pairs]
    twice = sorted({step for step in steps if steps.count(step) > 1})
    if twice:
        raise UsageError(f"thresholds {text!r} give step {', '.join(map(str, twice))} more than once; give each step "
                         "one threshold, such as 0:0.05,10:0.5,20:0.8")
    return dict(pairs)


@dataclass
class AttendExciteConfig:
    """Every option of Attend-and-Excite, with the defaults of diffusers' StableDiffusionAttendAndExcitePipeline
    (docs/methods.md §5).

        AttendAndExcite(["cat", "dog"], max_iter_to_alter=10)     # or config=AttendExciteConfig(...)

    Against the run's number of denoising steps N (known when the run starts): a `max_iter_to_alter` above N or a
    threshold step >= N cannot act and is a UsageError, unless the field has its default value. The defaults are
    the reference's 50-step schedule and are kept on shorter runs (moving at every step there; threshold steps past
    the run's end are not reached), so a field equal to its default is never refused, whoever gave it.
    """

    targets: list | None = option(None, TARGETS_HELP, parse=comma_list, flag="--targets",
                                  shown_default="the prompt's nouns")
    max_iter_to_alter: int = option(25, "move the latents at the first N denoising steps", low=0, high=10_000)
    thresholds: dict = option({0: 0.05, 10: 0.5, 20: 0.8}, "step:threshold pairs where the move repeats until "
                              "every target's smoothed maximum reaches the threshold", parse=parse_thresholds,
                              shown_default="0:0.05,10:0.5,20:0.8")
    scale_factor: float = option(20.0, "step size: scale_factor · sqrt of linspace(1, 0.5, steps) at each step",
                                 low=0)
    max_refinement_steps: int = option(20, "most moves at a threshold step", low=1, high=10_000)
    resolution: int | None = option(None, "side of the cross-attention grid whose maps are read", parse=int,
                                    shown_default="16 (the reference's 16x16 sites), or the side nearest to 16 "
                                    "where the model has none (SDXL at 1024²: 32)", low=1, high=1024)

    cli_prefix = "ae-"  # its flags: --ae-max-iter-to-alter, ...; --targets is shared with Regulation

    def __post_init__(self):
        check(self)
        self.targets = normalise_targets(self.targets)
        if isinstance(self.thresholds, dict):  # a model folder's attnctl.json can only write the steps as strings
            given = self.thresholds
            self.thresholds = {int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: v
                               for k, v in given.items()}
            if len(self.thresholds) < len(given):
                raise UsageError(f"thresholds (--ae-thresholds) {given!r} give a step more than once (as a number and "
                                 "as text); give each step one threshold")
        if not isinstance(self.thresholds, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, (int, float))
                and not isinstance(v, bool) and 0 <= v <= 1 for k, v in self.thresholds.items()):
            raise UsageError(f"thresholds (--ae-thresholds) must map step indices >= 0 to thresholds in [0, 1], such "
                             f"as {{0: 0.05, 10: 0.5, 20: 0.8}}, not {self.thresholds!r}")
        self.thresholds = {int(k): float(v) for k, v in self.thresholds.items()}


class AttendAndExcite(LatentGuidance):
    """Attend-and-Excite as a controller: `AttendAndExcite(targets, config=None, **options)` with the fields of
    `AttendExciteConfig`. Run the pipeline through the session (`session(prompt, ...)`): the method moves the
    latents, which a plain `pipe(...)` call gives it no way to do. `history` holds, per moved step, each image's
    loss before the move and the number of refinement moves."""

    name = "Attend-and-Excite"
    reads = ("cross",)

    def __init__(self, targets=None, config: AttendExciteConfig | None = None, **options):
        if targets is not None:
            options["targets"] = targets
        self.config = build(AttendExciteConfig, config, **options)
        self.history: list[dict] = []

    @property
    def max_refinement_steps(self) -> int:
        """The config's `max_refinement_steps`: the most moves at a threshold step."""
        return self.config.max_refinement_steps

    def setup(self, session) -> None:
        """The positions of each prompt's target words (the config's `targets`, or the prompt's nouns) in its tokens."""
        words = targets_per_prompt(self.config.targets, session.prompts, self.name)
        self._positions = [target_positions(p, w) for p, w in zip(session.prompts, words)]

    def image_loss(self, maps: torch.Tensor, prompt: int) -> torch.Tensor:
        """The loss of the most neglected target: 1 − the least of the targets' smoothed maxima (`neglect_loss`)."""
        return neglect_loss(max_attention_per_token(maps, self._positions[prompt]))

    def moves_at(self, index: int) -> bool:
        """At the first `max_iter_to_alter` steps and at every threshold step."""
        return index < self.config.max_iter_to_alter or index in self.config.thresholds

    def moves_after_refinement(self, index: int) -> bool:
        """Only within the first `max_iter_to_alter` steps (a threshold step past them refines, then stops)."""
        return index < self.config.max_iter_to_alter

    def refine_target(self, index: int) -> float | None:
        """At a threshold step, 1 − its threshold (every target's smoothed maximum reaches it); None elsewhere."""
        threshold = self.config.thresholds.get(index)
        return None if threshold is None else max(0.0, 1.0 - threshold)

    def step_size(self, index: int, num_steps: int) -> float:
        """`scale_factor` · sqrt(linspace(1, 0.5, num_steps)[index]), as in the reference pipeline."""
        return self.config.scale_factor * float(np.sqrt(np.linspace(1.0, 0.5, num_steps)[index]))

    def check_steps(self, num_steps: int) -> None:
        """`LatentGuidance.check_steps` (`max_iter_to_alter`), and a threshold step at or past `num_steps`, unless
        the thresholds are the default (see `AttendExciteConfig`)."""
        super().check_steps(num_steps)
        c = self.config
        beyond = sorted(s for s in c.thresholds if s >= num_steps)
        default = default_of(next(f for f in dataclasses.fields(AttendExciteConfig) if f.name == "thresholds"))
        if beyond and c.thresholds != default:
            raise UsageError(f"thresholds ({flag_of(AttendExciteConfig, 'thresholds')}) name step(s) "
                             f"{', '.join(map(str, beyond))}, which this run's {num_steps} denoising steps (0 to "
                             f"{num_steps - 1}) never reach; give threshold steps below {num_steps} or more --steps "
                             "(num_inference_steps)")

    def resolution(self) -> int | None:
        """The config's `resolution` (None: 16, or the side nearest to it)."""
        return self.config.resolution

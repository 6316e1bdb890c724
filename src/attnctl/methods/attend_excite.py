"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv 2301.13826) as an attnctl controller.

    with attnctl.apply(pipe, AttendAndExcite(["cat", "dog"]), prompt=prompt) as session:
        image = session(prompt, generator=generator).images[0]      # through the session, not pipe(...)

At each of the first denoising steps, before the denoiser's step, the latents move down the gradient of a loss on
the cross-attention maps of a gradient-enabled conditional forward: the loss of the most neglected target token,
1 − its smoothed maximum attention (`attend_excite_math`). At threshold steps the move repeats until every target
reaches the step's threshold (at most `max_refinement_steps` times). The definition and its defaults are those of
diffusers' `StableDiffusionAttendAndExcitePipeline`; docs/methods.md §5 states them and what decides exactness.

How the new latents reach the pipeline without changing it: the update of step i + 1 runs in the pipeline's
`callback_on_step_end` at the end of step i (it returns the new latents, as that callback may); the update of step 0
needs the pipeline's first denoiser inputs before it starts, so `session(...)` first starts the pipeline and stops it
at its first denoiser call (text encoding and the initial draw only: a generator advances as the run's own draw
advances it), then runs it with the updated initial latents. Exact where the scheduler's initial noise scale is 1
(DDIM, PNDM, DPM-Solver, the SD defaults); within float rounding for Euler-type schedulers.

Beyond the pipeline: all images of a batch in one gradient forward (their losses are independent, so each image's
gradient is its own), with the refinement continuing only for the images still below the threshold; the forward
stops at the last site it reads; no forward at steps that cannot move the latents; SDXL and any UNet pipeline with a
step callback; targets as words (`--targets`, the prompt's nouns by default).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import explicit_probs
from ..config import build, check, comma_list, option
from ..control import AttentionCall, Controller, StepState
from ..errors import UsageError
from .attend_excite_math import max_attention_per_token, neglect_loss
from .targets import TARGETS_HELP, normalise_targets, target_positions, targets_per_prompt

log = logging.getLogger(__name__)

REFERENCE_RESOLUTION = 16


def parse_thresholds(text: str) -> dict[int, float]:
    """'0:0.05,10:0.5,20:0.8' -> {0: 0.05, 10: 0.5, 20: 0.8}."""
    out: dict[int, float] = {}
    try:
        for part in text.split(","):
            if part.strip():
                step, _, value = part.partition(":")
                out[int(step)] = float(value)
    except ValueError:
        raise UsageError(f"thresholds {text!r}: write step:threshold pairs such as 0:0.05,10:0.5,20:0.8") from None
    return out


@dataclass
class AttendExciteConfig:
    """Every option of Attend-and-Excite, with the defaults of diffusers' StableDiffusionAttendAndExcitePipeline
    (docs/methods.md §5).

        AttendAndExcite(["cat", "dog"], max_iter_to_alter=10)     # or config=AttendExciteConfig(...)
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
        if not isinstance(self.thresholds, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, (int, float))
                and not isinstance(v, bool) and 0 <= v <= 1 for k, v in self.thresholds.items()):
            raise UsageError(f"thresholds (--ae-thresholds) must map step indices >= 0 to thresholds in [0, 1], such "
                             f"as {{0: 0.05, 10: 0.5, 20: 0.8}}, not {self.thresholds!r}")
        self.thresholds = {int(k): float(v) for k, v in self.thresholds.items()}


class _MapsComplete(Exception):
    """Ends a gradient forward once the last site it reads has been seen: later layers cannot change the loss."""


class AttendAndExcite(Controller):
    """Attend-and-Excite as a controller: `AttendAndExcite(targets, config=None, **options)` with the fields of
    `AttendExciteConfig`. Run the pipeline through the session (`session(prompt, ...)`): the method moves the
    latents, which a plain `pipe(...)` call gives it no way to do. `history` holds, per moved step, each image's
    loss before the move and the number of refinement moves."""

    def __init__(self, targets=None, config: AttendExciteConfig | None = None, **options):
        if targets is not None:
            options["targets"] = targets
        self.config = build(AttendExciteConfig, config, **options)
        self.history: list[dict] = []

    # --- Controller --------------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        if not any(s.kind == "cross" for s in session.sites):
            raise UsageError("Attend-and-Excite reads UNet cross-attention (SD 1.x/2.x, SDXL); this "
                             f"{session.family.name} model has none")
        if not session.prompts:
            raise UsageError("Attend-and-Excite needs the prompt: pass prompt=... to attnctl.apply")
        words = targets_per_prompt(self.config.targets, session.prompts, "Attend-and-Excite")
        self._positions = [target_positions(p, w) for p, w in zip(session.prompts, words)]
        self.session = session
        self._prepared = False

    def wants(self, site) -> bool:
        return site.kind == "cross"

    def begin_run(self) -> None:
        if not self._prepared:
            raise UsageError("Attend-and-Excite moves the latents between denoising steps, which a plain pipeline "
                             "call gives it no way to do: call the pipeline through the session, "
                             "`with attnctl.apply(pipe, AttendAndExcite(...), prompt=p) as session: "
                             "session(p, ...)`, instead of `pipe(p, ...)`")
        self._prepared = False

    def prepare_call(self, session, args, kwargs) -> dict:
        accepted = inspect.signature(session.pipe.__call__).parameters
        missing = [name for name in ("latents", "callback_on_step_end") if name not in accepted]
        if missing:
            raise UsageError(f"Attend-and-Excite moves the latents through the pipeline's {' and '.join(missing)} "
                             f"argument(s), which {type(session.pipe).__name__} does not take")
        first_args, first_kwargs, step = session.first_denoiser_call(args, kwargs)
        scheduler = session.pipe.scheduler
        sample = first_args[0] if first_args else first_kwargs["sample"]
        rows = step.cond_rows
        scale = copy.deepcopy(scheduler).scale_model_input(torch.ones_like(sample[:1]), scheduler.timesteps[0])
        latents = sample[rows] / scale
        self._inputs = self._conditioning(first_args, first_kwargs, step)
        self._check_resolution(step.token_grid)
        latents = self.move(latents, 0, step)
        user_callback = kwargs.get("callback_on_step_end")
        names = list(getattr(user_callback, "tensor_inputs", None) or kwargs.get("callback_on_step_end_tensor_inputs")
                     or ["latents"])

        def on_step_end(pipe, i, t, tensors):
            out = dict(user_callback(pipe, i, t, tensors) or {}) if user_callback is not None else {}
            nxt = i + 1
            if nxt < len(pipe.scheduler.timesteps) and self._moves_at(nxt):
                self._inputs = self._conditioning(*session.inputs, session.step)
                out["latents"] = self.move(out.get("latents", tensors["latents"]), nxt, session.step)
            return out

        self._prepared = True
        return {**kwargs, "latents": latents / scheduler.init_noise_sigma, "callback_on_step_end": on_step_end,
                "callback_on_step_end_tensor_inputs": names + [n for n in ["latents"] if n not in names]}

    def exclusive_call(self, call: AttentionCall) -> None:
        if call.grid != self._grid:
            return
        probs = explicit_probs(call.q[:, :, call.image], call.k[:, :, call.text], call.scale, dtype=torch.float32)
        self._sum = probs.sum(dim=1) if self._sum is None else self._sum + probs.sum(dim=1)
        self._heads += probs.shape[1]
        self._seen += 1
        if self._seen == self._n_sites:
            raise _MapsComplete

    # --- the method ----------------------------------------------------------------------------------------------
    def _moves_at(self, index: int) -> bool:
        return index < self.config.max_iter_to_alter or index in self.config.thresholds

    def move(self, latents: torch.Tensor, index: int, step: StepState) -> torch.Tensor:
        """The latents of step `index` (one row per conditional image) after the step's moves."""
        if not self._moves_at(index):
            return latents
        c = self.config
        timesteps = self.session.pipe.scheduler.timesteps
        t = timesteps[index]
        alpha = c.scale_factor * float(np.sqrt(np.linspace(1.0, 0.5, len(timesteps))[index]))
        prompts = [min(step.prompt_of_row(r), len(self._positions) - 1) for r in range(latents.shape[0])]
        z = latents.detach()
        every = torch.arange(z.shape[0])
        loss, grad = self._loss_and_grad(z, t, every, prompts)
        moves = torch.zeros(z.shape[0], dtype=torch.long)
        if index in c.thresholds:
            target = max(0.0, 1.0 - c.thresholds[index])
            running = loss > target
            while running.any():
                idx = running.nonzero().flatten()
                moves[idx] += 1
                body_loss = loss[idx]
                z = z.clone()
                z[idx] = _stepped(z[idx], grad[idx], body_loss, alpha)
                loss[idx], grad[idx] = self._loss_and_grad(z[idx], t, idx, prompts)
                running[idx] = (body_loss > target) & (moves[idx] < c.max_refinement_steps)
        if index < c.max_iter_to_alter:
            z = _stepped(z, grad, loss, alpha)
        self.history.append({"step": index, "loss": loss.tolist(), "refinement_moves": moves.tolist()})
        log.debug("Attend-and-Excite step %d: losses %s", index, [round(x, 4) for x in loss.tolist()])
        return z.to(latents.dtype)

    def _conditioning(self, args, kwargs, step: StepState) -> tuple[dict, StepState]:
        """A pipeline denoiser call's arguments by name, less the latents (the step's gradient forwards reuse them)."""
        denoiser = self.session.denoiser
        named = inspect.signature(type(denoiser).forward).bind_partial(denoiser, *args, **kwargs).arguments
        named.pop("self", None)
        named.pop("sample", None)
        return named, step

    def _loss_and_grad(self, z, t, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's loss at latents `z` (the images `images` of the batch) and its gradient with respect to its
        own latents."""
        named, step = self._inputs
        denoiser = self.session.denoiser
        rows = [step.cond_rows.start + int(i) for i in images]
        inputs = {**_rows_of(named, rows, step.batch_size), "timestep": t, "return_dict": False}
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            self._sum, self._heads, self._seen = None, 0, 0
            with self.session.exclusive(self):
                try:
                    denoiser(z, **inputs)
                except _MapsComplete:
                    pass
            if self._sum is None:
                raise RuntimeError(f"Attend-and-Excite read no attention map at the {self._grid} sites")
            maps = (self._sum / self._heads).unflatten(1, self._grid)  # (images, H, W, text)
            losses = torch.stack([neglect_loss(max_attention_per_token(maps[j], self._positions[prompts[int(i)]]))
                                  for j, i in enumerate(images)])
            grad = torch.autograd.grad(losses.sum(), z)[0] if losses.requires_grad else torch.zeros_like(z)
        return losses.detach(), grad

    def _check_resolution(self, token_grid: tuple[int, int]) -> None:
        cross = [s for s in self.session.sites if s.kind == "cross"]
        grids = {s.name: s.grid(token_grid) for s in cross}
        sides = sorted({max(g) for g in grids.values()})
        wanted = self.config.resolution
        if wanted is None:  # the reference's 16, or the side nearest to it (the larger on a tie)
            wanted = min(sides, key=lambda side: (abs(math.log2(side / REFERENCE_RESOLUTION)), -side))
        chosen = [name for name, g in grids.items() if max(g) == wanted]
        if not chosen:
            raise UsageError(f"Attend-and-Excite: no cross-attention site runs at side {wanted} at this image size; "
                             f"the sides here are {', '.join(map(str, sides))} (--ae-resolution)")
        self._grid = grids[chosen[0]]
        self._n_sites = len(chosen)


def _stepped(z, grad, loss, alpha: float) -> torch.Tensor:
    """z − α·∇ for the images whose loss is not 0 (the reference moves only those)."""
    moving = (loss != 0).view(-1, *[1] * (z.dim() - 1))
    return torch.where(moving, z - alpha * grad, z)


def _rows_of(value, rows: list[int], batch: int):
    """`value` with every tensor whose first dimension is the batch cut to `rows` (inside dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows_of(v, rows, batch) for v in value)
    return value

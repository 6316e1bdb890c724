"""The machinery of the methods that move the latents down the gradient of a loss on attention maps
(Attend-and-Excite, the binding method): a subclass says what the loss of one image is and when and how far to move;
this module runs the gradient forwards, reads the maps and hands the moved latents to the pipeline.

How the new latents reach the pipeline without changing it: the move of step i + 1 runs in the pipeline's
`callback_on_step_end` at the end of step i (it returns the new latents, as that callback may); the move of step 0
needs the pipeline's first denoiser inputs before it starts, so `session(...)` first starts the pipeline and stops it
at its first denoiser call (text encoding and the initial draw only: a generator advances as the run's own draw
advances it), then runs it with the moved initial latents. Exact where the scheduler's initial noise scale is 1
(DDIM, PNDM, DPM-Solver, flow matching); within float rounding for Euler-type schedulers. Where the pipeline appends
other tokens to its latents in the denoiser's input (FLUX.1 Kontext's context image: `Family.split_latents`), only
its latents move: the gradient forwards get the appended tokens as the pipeline built them.

The maps: each image pixel's attention on the text tokens, the softmax over the text keys alone, averaged over heads
and the sites read: on a UNet the cross-attention sites at one resolution (`resolution`, 16 by default, as the
references), on an MMDiT every joint-attention block (its image→text part, re-normalised over the text keys). All
images of a batch go through one gradient forward (their losses are independent, so each image's gradient is its own);
the forward stops at the last site it reads.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math

import torch

from ..attention import explicit_probs
from ..config import default_of, flag_of
from ..control import AttentionCall, Controller, StepState
from ..errors import UsageError

log = logging.getLogger(__name__)

REFERENCE_RESOLUTION = 16


class _MapsComplete(Exception):
    """Ends a gradient forward once the last site it reads has been seen: later layers cannot change the loss."""


class LatentGuidance(Controller):
    """A method that moves the latents at some denoising steps. Subclasses set `name` (for messages) and `reads`
    (the site kinds whose maps the loss reads) and define `setup`, `image_loss`, `moves_at` and `step_size`;
    `refine_target` makes a step repeat its move until an image's loss is at most the target. Run the pipeline
    through the session (`session(prompt, ...)`). `history` holds, per moved step, each image's loss before the
    move and the number of refinement moves."""

    name = "a latent-guidance method"
    reads: tuple[str, ...] = ("cross",)
    handles_key_mask = True  # its maps take the model's text padding mask (masked keys 0)
    max_refinement_steps = 0

    # --- what a subclass defines -------------------------------------------------------------------------------
    def setup(self, session) -> None:
        """At attach: read the prompts (`session.prompts`) and find the token positions the loss needs."""

    def image_loss(self, maps: torch.Tensor, prompt: int) -> torch.Tensor:
        """The loss of one image: `maps` (H, W, text tokens), the image's prompt index."""
        raise NotImplementedError

    def moves_at(self, index: int) -> bool:
        """Whether the latents move before step `index` is denoised."""
        raise NotImplementedError

    def step_size(self, index: int, num_steps: int) -> float:
        """How far the latents of step `index` (of `num_steps`) move: α in z − α·∇loss."""
        raise NotImplementedError

    def moves_after_refinement(self, index: int) -> bool:
        """Whether step `index` ends with one more move (after its refinement, if it has one)."""
        return True

    def refine_target(self, index: int) -> float | None:
        """The loss a step's moves repeat down to (None: one move)."""
        return None

    def resolution(self) -> int | None:
        """The side of the UNet cross-attention grid read (None: 16, or the side nearest to it)."""
        return None

    # --- Controller --------------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        """Refuses a model without sites of the kinds in `reads`, or no prompt; then `setup`."""
        kinds = {"cross": "UNet cross-attention (SD 1.x/2.x, SDXL)", "joint": "MMDiT joint attention (SD3, FLUX)"}
        if not any(s.kind in self.reads for s in session.sites):
            raise UsageError(f"{self.name} reads {' or '.join(kinds[k] for k in self.reads)}; this "
                             f"{session.family.name} model has none")
        if not session.prompts:
            raise UsageError(f"{self.name} needs the prompt: pass prompt=... to attnctl.apply")
        self.history: list[dict] = []
        self.session = session
        self._prepared = False
        self.setup(session)

    def wants(self, site) -> bool:
        """The sites of the kinds in `reads`."""
        return site.kind in self.reads

    def begin_run(self) -> None:
        """Refuses a pipeline call made without the session (`prepare_call` did not run for it)."""
        if not self._prepared:
            raise UsageError(f"{self.name} moves the latents between denoising steps, which a plain pipeline call "
                             "gives it no way to do: call the pipeline through the session, "
                             "`with attnctl.apply(pipe, method, prompt=p) as session: session(p, ...)`, instead of "
                             "`pipe(p, ...)`")
        self._prepared = False

    def prepare_call(self, session, args, kwargs) -> dict:
        """The call's arguments with step 0's moved initial latents (from a run stopped at its first denoiser call)
        and a step-end callback that moves the later steps' latents, around the caller's own callback."""
        require_call_parameters(session.pipe, self.name, ("latents", "callback_on_step_end"))
        latents, first_args, first_kwargs, step = initial_latents(session, args, kwargs)
        scheduler = session.pipe.scheduler
        self._inputs = self._conditioning(first_args, first_kwargs, step)
        self._timestep_scale = timestep_scale(self._inputs[0], scheduler.timesteps[0])
        self._choose_sites(step.token_grid)
        latents = self.move(latents, 0, step)

        def move_next(pipe, i, current):
            nxt = i + 1
            if nxt < len(pipe.scheduler.timesteps) and self.moves_at(nxt):
                self._inputs = self._conditioning(*session.conditional_call)
                return self.move(current, nxt, session.step)
            return None

        self._prepared = True
        return {**moving_latents(kwargs, move_next), "latents": latents / getattr(scheduler, "init_noise_sigma", 1.0)}

    def exclusive_call(self, call: AttentionCall) -> None:
        """In a gradient forward: adds a read site's image→text probabilities, summed over heads, to the maps; ends the
        forward after the last read site."""
        if call.site.name not in self._sites:
            return
        bias = None if call.key_bias is None else call.key_bias[..., call.text]  # a text padding mask: masked keys 0
        probs = explicit_probs(call.q[:, :, call.image], call.k[:, :, call.text], call.scale, dtype=torch.float32,
                               bias=bias)
        self._sum = probs.sum(dim=1) if self._sum is None else self._sum + probs.sum(dim=1)
        self._heads += probs.shape[1]
        self._seen += 1
        if self._seen == len(self._sites):
            raise _MapsComplete

    # --- the moves ---------------------------------------------------------------------------------------------
    def check_steps(self, num_steps: int) -> None:
        """Before the run's first move, once its step count is known: a UsageError for an option the person set
        that cannot act in `num_steps` steps (default: `max_iter_to_alter` above it, where the config has one;
        values equal to the config's default are never refused, as they cover any step count)."""
        field = next((f for f in dataclasses.fields(self.config) if f.name == "max_iter_to_alter"), None)
        value = getattr(self.config, "max_iter_to_alter", None)
        if field is not None and value > num_steps and value != default_of(field):
            raise UsageError(f"max_iter_to_alter ({flag_of(type(self.config), 'max_iter_to_alter')}) is {value}, more "
                             f"than this run's {num_steps} denoising steps; give at most {num_steps} (every step "
                             "moved) or more --steps (num_inference_steps)")

    def move(self, latents: torch.Tensor, index: int, step: StepState) -> torch.Tensor:
        """The latents of step `index` (one row per conditional image) after the step's moves; before the first,
        options that cannot act in the run are refused (`check_steps`)."""
        if index == 0:
            self.check_steps(step.num_steps)
        if not self.moves_at(index):
            return latents
        timesteps = self.session.pipe.scheduler.timesteps
        t = timesteps[index]
        alpha = self.step_size(index, len(timesteps))
        prompts = [min(step.prompt_of_row(r), len(self.session.prompts) - 1) for r in range(latents.shape[0])]
        z = latents.detach()
        every = torch.arange(z.shape[0])
        loss, grad = self._loss_and_grad(z, t, every, prompts)
        moves = torch.zeros(z.shape[0], dtype=torch.long)
        target = self.refine_target(index)
        if target is not None:
            running = loss > target
            while running.any():
                idx = running.nonzero().flatten()
                moves[idx] += 1
                body_loss = loss[idx]
                z = z.clone()
                z[idx] = _stepped(z[idx], grad[idx], body_loss, alpha)
                loss[idx], grad[idx] = self._loss_and_grad(z[idx], t, idx, prompts)
                running[idx] = (body_loss > target) & (moves[idx] < self.max_refinement_steps)
        if self.moves_after_refinement(index):
            z = _stepped(z, grad, loss, alpha)
        self.history.append({"step": index, "loss": loss.tolist(), "refinement_moves": moves.tolist()})
        log.debug("%s step %d: losses %s", self.name, index, [round(x, 4) for x in loss.tolist()])
        return z.to(latents.dtype)

    def _conditioning(self, args, kwargs, step: StepState) -> tuple[dict, StepState, torch.Tensor | None]:
        """A pipeline denoiser call's arguments by name, less the latents, and the tokens the pipeline appends to
        its latents in that call (FLUX.1 Kontext's context image; None where it appends none): the step's gradient
        forwards reuse both."""
        return denoiser_arguments(self.session, args, kwargs), step, appended_tokens(self.session, args, kwargs)

    def _loss_and_grad(self, z, t, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's loss at latents `z` (the images `images` of the batch) and its gradient with respect to its
        own latents."""
        named, step, appended = self._inputs
        denoiser = self.session.denoiser
        rows = [step.cond_rows.start + int(i) for i in images]
        inputs = row_inputs(named, step, rows, t, self._timestep_scale)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            self._sum, self._heads, self._seen = None, 0, 0
            with self.session.exclusive(self, step):
                try:
                    denoiser(with_appended(z, appended, rows), **inputs)
                except _MapsComplete:
                    pass
            if self._sum is None:
                raise RuntimeError(f"{self.name} read no attention map at the sites {sorted(self._sites)}")
            maps = (self._sum / self._heads).unflatten(1, self._grid)  # (images, H, W, text)
            losses = torch.stack([self.image_loss(maps[j], prompts[int(i)]) for j, i in enumerate(images)])
            grad = torch.autograd.grad(losses.sum(), z)[0] if losses.requires_grad else torch.zeros_like(z)
        return losses.detach(), grad

    def _choose_sites(self, token_grid: tuple[int, int]) -> None:
        """The sites whose maps are read: the UNet cross-attention sites at the resolution asked for, or every joint
        site."""
        read = [s for s in self.session.sites if s.kind in self.reads]
        grids = {s.name: s.grid(token_grid) for s in read}
        if all(s.kind == "joint" for s in read):
            self._sites = set(grids)
            self._grid = grids[read[0].name]
            return
        sides = sorted({max(g) for g in grids.values()})
        wanted = self.resolution()
        if wanted is None:  # the reference's 16, or the side nearest to it (the larger on a tie)
            wanted = min(sides, key=lambda side: (abs(math.log2(side / REFERENCE_RESOLUTION)), -side))
        chosen = [name for name, g in grids.items() if max(g) == wanted]
        if not chosen:
            raise UsageError(f"{self.name}: no cross-attention site runs at side {wanted} at this image size; "
                             f"the sides here are {', '.join(map(str, sides))} (--{self.config.cli_prefix}resolution)")
        self._grid = grids[chosen[0]]
        self._sites = set(chosen)


def denoiser_arguments(session, args, kwargs) -> dict:
    """A pipeline denoiser call's arguments by name, less the latents: the conditioning that extra forwards of the
    same step reuse (as the family gives it to forwards of attnctl's own: `Family.replay_arguments`)."""
    denoiser = session.denoiser
    named = inspect.signature(type(denoiser).forward).bind_partial(denoiser, *args, **kwargs).arguments
    named.pop("self", None)
    named.pop(session.family.latents_name, None)
    return session.family.replay_arguments(named)


def appended_tokens(session, args, kwargs) -> torch.Tensor | None:
    """The tokens the pipeline appends after its latents in a denoiser call's latent input (FLUX.1 Kontext's context
    image), every row of the call's batch; None where it appends none (`Family.split_latents`)."""
    family = session.family
    return family.split_latents(family.latents(args, kwargs), args, kwargs)[1]


def with_appended(z: torch.Tensor, appended: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
    """The denoiser's latent input for latents `z` of the batch rows `rows`: `z`, followed by those rows of the
    tokens the pipeline appends (as it built them; no gradient flows into them)."""
    if appended is None:
        return z
    return torch.cat([z, appended[rows].to(z.dtype)], dim=1)


def timestep_scale(named: dict, t: torch.Tensor) -> float:
    """What the pipeline multiplies the scheduler's timestep `t` by before the denoiser sees it (FLUX: 1/1000), from
    the arguments of a denoiser call at `t`."""
    given = named.get("timestep")
    if not isinstance(given, torch.Tensor) or float(t) == 0:
        return 1.0
    return float(given.flatten()[0]) / float(t)


def row_inputs(named: dict, step: StepState, rows: list[int] | slice, t, scale: float) -> dict:
    """The arguments `named` cut to the batch rows `rows` (a slice cuts without making an index tensor on the host),
    at scheduler timestep `t` (times `scale`), for a forward that returns a tuple."""
    inputs = _rows_of(named, rows, step.batch_size)
    given = named.get("timestep")
    timestep = t if scale == 1.0 else t * scale
    if isinstance(given, torch.Tensor) and given.dim() > 0:
        timestep = timestep.to(given.dtype).expand(rows.stop - rows.start if isinstance(rows, slice) else len(rows))
    inputs.update(timestep=timestep, return_dict=False)
    return inputs


def require_call_parameters(pipe, who: str, names) -> None:
    """A UsageError naming the parameters among `names` the pipeline's call does not take (`who` moves the latents
    through them)."""
    missing = [name for name in names if name not in inspect.signature(pipe.__call__).parameters]
    if missing:
        raise UsageError(f"{who} moves the latents through the pipeline's {' and '.join(missing)} argument(s), "
                         f"which {type(pipe).__name__} does not take")


def moving_latents(kwargs: dict, move) -> dict:
    """The call's keyword arguments with a step-end callback that runs the caller's own callback first, then
    replaces the latents with `move(pipe, step index, latents)` where that returns a tensor (None: unchanged)."""
    user_callback = kwargs.get("callback_on_step_end")
    names = list(getattr(user_callback, "tensor_inputs", None) or kwargs.get("callback_on_step_end_tensor_inputs")
                 or ["latents"])

    def on_step_end(pipe, i, t, tensors):
        out = dict(user_callback(pipe, i, t, tensors) or {}) if user_callback is not None else {}
        moved = move(pipe, i, out.get("latents", tensors["latents"]))
        if moved is not None:
            out["latents"] = moved
        return out

    return {**kwargs, "callback_on_step_end": on_step_end,
            "callback_on_step_end_tensor_inputs": names + [n for n in ["latents"] if n not in names]}


def initial_latents(session, args, kwargs) -> tuple[torch.Tensor, tuple, dict, StepState]:
    """The run's initial latents as its first denoiser call gets them (the conditional rows, the scheduler's input
    scaling undone; without the tokens the pipeline appends to them, `Family.split_latents`), with that call's
    arguments and batch layout. The pipeline is started and stopped at its first denoiser call, so a generator
    advances as the run's own draw advances it; pass the latents back as the pipeline's `latents` divided by the
    scheduler's `init_noise_sigma`."""
    first_args, first_kwargs, step = session.first_denoiser_call(args, kwargs)
    scheduler = session.pipe.scheduler
    family = session.family
    sample = family.split_latents(family.latents(first_args, first_kwargs), first_args, first_kwargs)[0]
    scale = torch.ones_like(sample[:1])
    if hasattr(scheduler, "scale_model_input"):
        scale = copy.deepcopy(scheduler).scale_model_input(scale, scheduler.timesteps[0])
    return sample[step.cond_rows] / scale, first_args, first_kwargs, step


def _stepped(z, grad, loss, alpha: float) -> torch.Tensor:
    """z − α·∇ for the images whose loss is not 0 (the references move only those)."""
    moving = (loss != 0).view(-1, *[1] * (z.dim() - 1))
    return torch.where(moving, z - alpha * grad, z)


def _rows_of(value, rows: list[int] | slice, batch: int):
    """`value` with every tensor whose first dimension is the batch cut to `rows` (inside dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows_of(v, rows, batch) for v in value)
    return value

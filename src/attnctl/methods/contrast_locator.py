"""Where each object is forming, read from the model's own prediction rather than its attention: relocation's
`locator="contrast"` (issue 28).

At the latents after the last read step, the denoiser predicts once for the prompt and once for the prompt without
object i's phrase (the same latents, the same timestep, the conditional rows only). Where object i is forming, the
prompt without it predicts something else; elsewhere the two agree. So object i's map is, per latent cell, the norm
over channels of the difference of the two predictions. On `builtin:shapes-mmdit`, whose image→text attention does
not show where objects are, this finds them (BENCHMARKS.md, "The contrast locator").

The prompts without each object are encoded by the pipeline itself: before the run, a call with the edited prompt is
stopped at its first denoiser call (as Attend-and-Excite's machinery starts a run), which gives that prompt's
conditioning in exactly the form this family's denoiser takes. Cost: one text encoding per object before the run,
and 1 + (objects) denoiser forwards of the conditional rows at the read step.
"""

from __future__ import annotations

import copy
import re

import torch

from ..errors import UsageError
from ..families.base import argument
from .latent_guidance import appended_tokens, denoiser_arguments, row_inputs, timestep_scale, with_appended

CONNECTOR = r"(?:\s*,\s*and\s+|\s+and\s+|\s*,\s*)"  # what joins two objects' phrases: "and", ", and", ","


def prompt_without(prompt: str, span: tuple[int, int]) -> str:
    """`prompt` without the phrase at the character `span` and one connector beside it (the following one, else the
    preceding one): "a red circle and a blue square" without its first phrase is "a blue square"."""
    start, end = span
    after = re.match(CONNECTOR, prompt[end:])
    if after:
        return (prompt[:start] + prompt[end + after.end():]).strip()
    before = re.search(CONNECTOR + r"$", prompt[:start])
    head = prompt[:before.start()] if before else prompt[:start]
    return re.sub(r"\s{2,}", " ", head + prompt[end:]).strip()


class EditedPrompts:
    """The denoiser's conditional predictions for edited versions of the call's prompt (`edit(prompt)` gives them),
    each encoded by the pipeline itself before the run (a call with the edited prompt stopped at its first denoiser
    call); built in a method's `prepare_call` from the call's arguments. `who` and `instead` name the method and the
    fix in its refusals."""

    def __init__(self, session, controller, args: tuple, kwargs: dict, edit, who: str, instead: str):
        prompt = kwargs.get("prompt", args[0] if args else None)
        if not isinstance(prompt, str) or kwargs.get("prompt_embeds") is not None:
            raise UsageError(f"{who} encodes edited versions of the prompt, so it needs the prompt as one string "
                             f"(prompt=\"...\"), not prompt embeddings or a list; pass the text, or {instead}")
        for other in ("prompt_2", "prompt_3"):
            if kwargs.get(other) not in (None, prompt):
                raise UsageError(f"{who} edits the prompt, and {other} differs from it; leave {other} unset or "
                                 f"{instead}")
        self.session, self.controller, self.who, self.instead = session, controller, who, instead
        call = {k: v for k, v in kwargs.items() if k not in ("generator", "latents", "callback_on_step_end",
                                                              "callback_on_step_end_tensor_inputs")}
        rest = args[1:] if args and "prompt" not in kwargs else args
        self.edited = edit(prompt)
        self.encoded: list[tuple[dict, object]] = []
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the probes' draws must not move the caller's random state
            for text in self.edited:
                named_args, named_kwargs, step = session.first_denoiser_call(rest, {**call, "prompt": text})
                given = argument(named_args, named_kwargs, session.family.latents_name, 0)
                if not isinstance(given, torch.Tensor):
                    raise UsageError(f"{who} runs the denoiser itself on the pipeline's latents, which this "
                                     f"{session.family.name} denoiser takes in another form: {instead}; the methods "
                                     "that act on the attention of the pipeline's own denoiser calls can run on it")
                self.encoded.append((denoiser_arguments(session, named_args, named_kwargs), step))
        named, step = self.encoded[-1]  # a family refuses, here before any step, a forward of attnctl's it cannot take
        rows = list(range(step.cond_rows.start, step.cond_rows.stop))
        session.family.token_grid(session.denoiser, (), {session.family.latents_name: given[rows],
                                                         **row_inputs(named, step, rows, torch.ones(()), 1.0)})

    def output(self, index: int, latent_input: torch.Tensor, timestep) -> torch.Tensor:
        """The denoiser's own output (its first; the layout the pipeline reads) for edited prompt `index`, on
        `latent_input` (the conditional rows' latent input as a denoiser call of the pipeline's gave it, appended
        tokens included) at `timestep` (as that call gave it), in a forward of the controller's own."""
        named, step = self.encoded[index]
        return self._forward(named, step, step.cond_rows, latent_input, timestep, 1.0, grid=step.token_grid)

    def _forward(self, named: dict, step, rows: list[int] | slice, latent_input: torch.Tensor, t, scale: float,
                 grid: tuple[int, int] | None = None) -> torch.Tensor:
        count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        if count != latent_input.shape[0]:
            raise UsageError(f"{self.who} needs one conditional row per image in each denoiser call; this "
                             f"{self.session.family.name} call has {count} for {latent_input.shape[0]} images "
                             f"(a separate guidance pass?); {self.instead}")
        inputs = row_inputs(named, step, rows, t, scale)
        with torch.no_grad(), self.session.exclusive(self.controller, step, grid):  # `__init__` checked the forward
            out = self.session.denoiser(latent_input.to(self.session.denoiser.dtype), **inputs)
        return out[0] if isinstance(out, (tuple, list)) else out.sample


class ContrastLocator(EditedPrompts):
    """Built in the method's `prepare_call` (before the run) from the call's arguments; `maps(latents, index)` at
    the end of step `index` gives (images, objects, h, w)."""

    def __init__(self, session, controller, args: tuple, kwargs: dict, spans: list[tuple[int, int]],
                 who: str = "relocation's contrast locator", instead: str = "use --rl-locator attention"):
        super().__init__(session, controller, args, kwargs,
                         lambda prompt: [prompt_without(prompt, span) for span in spans], who, instead)

    def maps(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """Per image and object, the norm over channels of prediction(prompt) − prediction(prompt without the
        object) at `latents` (the pipeline's latents after step `index`) and the next step's timestep, on the
        latent grid."""
        session = self.session
        args, kwargs, step = session.conditional_call
        full = denoiser_arguments(session, args, kwargs)
        scheduler = session.pipe.scheduler
        timesteps = scheduler.timesteps
        t = timesteps[min(index + 1, len(timesteps) - 1)]
        scale = timestep_scale(full, timesteps[index])
        sample = latents
        if hasattr(scheduler, "scale_model_input"):  # the input scaling of the next step (Euler-type schedulers)
            sample = copy.deepcopy(scheduler).scale_model_input(latents, t)
        appended = appended_tokens(session, args, kwargs)  # FLUX.1 Kontext's context image, as the pipeline built it
        predict = [self._predict(full, step, sample, t, scale, appended)]
        predict += [self._predict(named, st, sample, t, scale, appended) for named, st in self.encoded]
        channels = -1 if latents.dim() == 3 else 1
        maps = torch.stack([(predict[0] - p).float().norm(dim=channels) for p in predict[1:]], 1)
        if latents.dim() == 3:  # packed: one token per cell of the denoiser's grid
            maps = maps.unflatten(-1, tuple(step.token_grid))
        return maps

    def _predict(self, named: dict, step, latents: torch.Tensor, t, scale: float, appended) -> torch.Tensor:
        rows = list(range(step.cond_rows.start, step.cond_rows.stop))
        out = self._forward(named, step, rows, with_appended(latents, appended, rows[:latents.shape[0]]), t, scale)
        if out.dim() == 3:  # packed: the latents' tokens of a prediction that may cover others too
            out = self.session.family.latents_prediction(out, latents.shape[1])
        if out.shape != latents.shape:
            raise UsageError(f"{self.who} runs the denoiser on the pipeline's latents, and this "
                             f"{self.session.family.name} denoiser predicts another shape ({tuple(out.shape)} for "
                             f"{tuple(latents.shape)}); {self.instead}")
        return out

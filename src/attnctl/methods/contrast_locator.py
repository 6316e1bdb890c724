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


class ContrastLocator:
    """Built in the method's `prepare_call` (before the run) from the call's arguments; `maps(latents, index)` at
    the end of step `index` gives (images, objects, h, w)."""

    def __init__(self, session, controller, args: tuple, kwargs: dict, spans: list[tuple[int, int]]):
        prompt = kwargs.get("prompt", args[0] if args else None)
        if not isinstance(prompt, str) or kwargs.get("prompt_embeds") is not None:
            raise UsageError("relocation's contrast locator encodes the prompt without each object, so it needs the "
                             "prompt as one string (prompt=\"...\"), not prompt embeddings or a list; pass the text, "
                             "or use --rl-locator attention")
        for other in ("prompt_2", "prompt_3"):
            if kwargs.get(other) not in (None, prompt):
                raise UsageError(f"relocation's contrast locator edits the prompt, and {other} differs from it; "
                                 f"leave {other} unset or use --rl-locator attention")
        self.session, self.controller = session, controller
        call = {k: v for k, v in kwargs.items() if k not in ("generator", "latents", "callback_on_step_end",
                                                              "callback_on_step_end_tensor_inputs")}
        rest = args[1:] if args and "prompt" not in kwargs else args
        self.edited = [prompt_without(prompt, span) for span in spans]
        self.without: list[tuple[dict, object]] = []
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the probes' draws must not move the caller's random state
            for text in self.edited:
                named_args, named_kwargs, step = session.first_denoiser_call(rest, {**call, "prompt": text})
                if not isinstance(session.family.latents(named_args, named_kwargs), torch.Tensor):
                    raise UsageError(f"relocation's contrast locator runs the denoiser on the pipeline's latents, "
                                     f"which this {session.family.name} denoiser takes in another form; use "
                                     "--rl-locator attention")
                self.without.append((denoiser_arguments(session, named_args, named_kwargs), step))

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
        predict += [self._predict(named, st, sample, t, scale, appended) for named, st in self.without]
        channels = -1 if latents.dim() == 3 else 1
        maps = torch.stack([(predict[0] - p).float().norm(dim=channels) for p in predict[1:]], 1)
        if latents.dim() == 3:  # packed: one token per cell of the denoiser's grid
            maps = maps.unflatten(-1, tuple(step.token_grid))
        return maps

    def _predict(self, named: dict, step, latents: torch.Tensor, t, scale: float, appended) -> torch.Tensor:
        rows = list(range(step.cond_rows.start, step.cond_rows.stop))
        if len(rows) != latents.shape[0]:
            raise UsageError(f"relocation's contrast locator needs one conditional row per image in each denoiser "
                             f"call; this {self.session.family.name} call has {len(rows)} for {latents.shape[0]} "
                             "images (a separate guidance pass?); use --rl-locator attention")
        inputs = row_inputs(named, step, rows, t, scale)
        with torch.no_grad(), self.session.exclusive(self.controller, step):
            out = self.session.denoiser(with_appended(latents, appended, rows).to(self.session.denoiser.dtype),
                                        **inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out.sample
        if out.dim() == 3:  # packed: the latents' tokens of a prediction that may cover others too
            out = self.session.family.latents_prediction(out, latents.shape[1])
        if out.shape != latents.shape:
            raise UsageError(f"relocation's contrast locator runs the denoiser on the pipeline's latents, and this "
                             f"{self.session.family.name} denoiser predicts another shape ({tuple(out.shape)} for "
                             f"{tuple(latents.shape)}); use --rl-locator attention")
        return out

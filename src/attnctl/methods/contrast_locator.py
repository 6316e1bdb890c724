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
        self._joined = joined_arguments(self.encoded)

    def outputs(self, latent_input: torch.Tensor, timestep) -> list[torch.Tensor]:
        """`output(i, latent_input, timestep)` of every edited prompt, from one denoiser forward of all their rows
        where their arguments differ only in batch-wise tensors (the same text length: one call instead of one per
        prompt); one forward each otherwise."""
        if self._joined is None or len(self.encoded) == 1:
            return [self.output(i, latent_input, timestep) for i in range(len(self.encoded))]
        count = len(self.encoded)
        step = self.encoded[0][1]
        rows = step.cond_rows
        if rows.stop - rows.start != latent_input.shape[0]:
            return [self.output(i, latent_input, timestep) for i in range(count)]  # refused there, with the message
        given = self.encoded[0][0].get("timestep")
        if isinstance(given, torch.Tensor) and given.dim() > 0:
            timestep = timestep.to(given.dtype).expand(latent_input.shape[0]).repeat(count)
        inputs = {**self._joined, "timestep": timestep, "return_dict": False}
        with torch.no_grad(), self.session.exclusive(self.controller, step, step.token_grid):
            out = self.session.denoiser(latent_input.to(self.session.denoiser.dtype).repeat(
                count, *([1] * (latent_input.dim() - 1))), **inputs)
        out = first_output(out)
        return list(out.chunk(count))

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
        return first_output(out)


class PredictionEdit:
    """What a method that changes the denoiser's prediction in `end_call` reads and writes: the conditional rows'
    inputs of the call, the generated image's part of a prediction, and the output with its first tensor replaced."""

    def __init__(self, session):
        self.session = session
        self.own_tokens = None  # the generated image's tokens in a packed output: read at a run's first call

    def begin_run(self) -> None:
        """Forgets the token count read in the run before (a new run may have another size or context)."""
        self.own_tokens = None

    def inputs(self, step, args, kwargs):
        """(latent input, timestep) of the call's conditional rows, as the denoiser was given them."""
        rows = step.cond_rows
        latent_input = argument(args, kwargs, self.session.family.latents_name, 0)[rows]
        timestep = denoiser_arguments(self.session, args, kwargs).get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.shape[0] == step.batch_size:
            timestep = timestep[rows]
        return latent_input, timestep

    def own(self, args, kwargs, out: torch.Tensor):
        """A function giving the generated image's latents' part of a prediction, as a view: the whole of an unpacked
        one; of a packed one (batch, tokens, channels) its latents' tokens (not FLUX.1 Kontext's context image or a
        FLUX.2 reference image, not Qwen-Image 2.1's text). Their count is read once per run (FLUX's reads the
        token ids back from the device)."""
        if out.dim() != 3:
            return lambda prediction: prediction
        family = self.session.family
        if self.own_tokens is None:
            own = family.split_latents(family.latents(args, kwargs), args, kwargs)[0]
            self.own_tokens = own.shape[1] if own.dim() == 3 else own.shape[-2] * own.shape[-1]
        return lambda prediction: family.latents_prediction(prediction, self.own_tokens)


def first_output(output) -> torch.Tensor:
    """A denoiser output's first tensor (the prediction the pipeline reads)."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def with_first_output(output, first: torch.Tensor):
    """`output` with its first tensor replaced by `first`, in the form the denoiser returned."""
    if isinstance(output, tuple):
        return (first, *output[1:])
    if isinstance(output, list):
        return [first, *output[1:]]
    output.sample = first
    return output


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



class _Unjoinable(Exception):
    pass


def joined_arguments(encoded: list[tuple[dict, object]]) -> dict | None:
    """The denoiser arguments of several prompts' runs (`encoded`: (arguments, step) pairs of the same batch layout)
    as one call's for all their conditional rows: batch-wise tensors cut to those rows and concatenated, every other
    value equal in all of them and taken once (`timestep` left out); None where they cannot be joined (different text
    lengths or batch layouts, other values). Compares values: call it before the run."""
    steps = [step for _, step in encoded]
    if any((s.batch_size, s.cond_rows) != (steps[0].batch_size, steps[0].cond_rows) for s in steps):
        return None
    rows, batch = steps[0].cond_rows, steps[0].batch_size

    def join(values):
        first = values[0]
        if isinstance(first, dict):
            if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
                raise _Unjoinable
            return {k: join([v[k] for v in values]) for k in first}
        if isinstance(first, (list, tuple)):
            if any(type(v) is not type(first) or len(v) != len(first) for v in values):
                raise _Unjoinable
            return type(first)(join([v[i] for v in values]) for i in range(len(first)))
        if isinstance(first, torch.Tensor):
            if any(not isinstance(v, torch.Tensor) or v.shape != first.shape or v.dtype != first.dtype for v in values):
                raise _Unjoinable
            if first.dim() > 0 and first.shape[0] == batch:  # batch-wise, as `row_inputs` cuts it
                return torch.cat([v[rows] for v in values])
            if all(torch.equal(v, first) for v in values):
                return first
            raise _Unjoinable
        try:
            same = all(v is first or bool(v == first) for v in values)
        except Exception:  # a value without a plain equality (an array, an object of tensors): not joined
            same = False
        if same:
            return first
        raise _Unjoinable

    try:
        return join([{k: v for k, v in named.items() if k != "timestep"} for named, _ in encoded])
    except _Unjoinable:
        return None

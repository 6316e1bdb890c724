"""Noise choice: each image starts from the one of a few starting noises whose first steps already show every object
(an attnctl method for issues 28 and 29; no published counterpart).

    with attnctl.apply(pipe, NoiseChoice(), prompt=prompt) as session:
        image = session(prompt, generator=generator).images[0]     # through the session, not pipe(...)

Why: on the built-in models which objects an image holds is decided early, by the starting noise, and the model's
attention does not show a lost object coming; its own prediction does. Object i's *contrast* at the latents x after
a few steps, mean over latent cells of ‖ε(x, t, prompt) − ε(x, t, prompt without object i)‖ (the contrast locator's
map), is weak for an object that will be missing: on the MMDiT's seen triples the weakest object's contrast over the
strongest's foresees "every object present" with AUC 0.71 after 8 of 25 steps (BENCHMARKS.md, issue 29).

So each image tries `candidates` starting noises: the one the plain pipeline draws for it and `candidates - 1` fixed
permutations of its values (each again independent standard normal values, so the image still starts from the noise
the model was made for; an image's candidates depend on its own noise alone, not on the rest of the batch). Each runs
the first `read_fraction` of the steps (the pipeline's own steps, with the caller's options); at the end of the last
read step each object's contrast is read and the candidate scores the weakest object's contrast over the strongest's.
The run proper then starts from each image's best candidate, as the plain pipeline would run from it. The caller's
generators are left where the plain run leaves them (stochastic schedulers draw the same noise in the run proper).

Cost: candidates × read steps + candidates × (1 + objects) forwards of the conditional rows, and one text encoding
per object, on top of the run: with 4 candidates and 8 of 25 steps, about 2.3× the plain pipeline (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..config import build, check, comma_list, option
from ..control import Controller
from ..errors import UsageError
from ..roles import object_phrase
from .contrast_locator import ContrastLocator
from .latent_guidance import initial_latents, require_call_parameters
from .targets import TARGETS_HELP, object_nouns, one_target_list

log = logging.getLogger(__name__)


@dataclass
class NoiseChoiceConfig:
    """Every option of noise choice (docs/methods.md §10)."""

    targets: list | None = option(None, "the nouns of the objects compared (each names one object's phrase, which "
                                  "the contrast leaves out); " + TARGETS_HELP.split("; ")[-1], parse=comma_list,
                                  flag="--targets", shown_default="the prompt's nouns")
    candidates: int = option(4, "starting noises tried per image: its own and candidates − 1 permutations of it (1: "
                             "the plain pipeline)", low=1, high=64)
    read_fraction: float = option(0.32, "each candidate runs this first fraction of the steps before the objects' "
                                  "contrasts are compared", low=0, high=1)

    cli_prefix = "nc-"  # its flags: --nc-candidates, --nc-read-fraction; --targets is shared

    def __post_init__(self):
        check(self)
        self.targets = one_target_list(self.targets, "noise choice")


class NoiseChoice(Controller):
    """Noise choice as a controller: `NoiseChoice(targets=None, config=None, **options)` with the fields of
    `NoiseChoiceConfig`. Run the pipeline through the session (`session(prompt, ...)`). `choices` holds, per image of
    the last run, each candidate's score and the candidate chosen."""

    name = "noise choice"

    def __init__(self, targets=None, config: NoiseChoiceConfig | None = None, **options):
        if targets is not None:
            options["targets"] = targets
        self.config = build(NoiseChoiceConfig, config, **options)
        self.choices: list[dict] = []

    def attach(self, session) -> None:
        """Finds each object's phrase (the phrase of each target noun); a UsageError without one prompt or with
        fewer than two objects."""
        prompt, nouns = object_nouns(session, self.config.targets, self.name)
        self.spans = [object_phrase(prompt, noun) for noun in nouns]
        self.session = session
        self._prepared = self._choosing = False

    def wants(self, site) -> bool:
        """No attention site: it reads the denoiser's predictions."""
        return False

    def begin_run(self) -> None:
        """Refuses a pipeline call made without the session."""
        if self._choosing:
            return
        if not self._prepared:
            raise UsageError("noise choice starts each image from a noise chosen before the run, which a plain "
                             "pipeline call gives it no way to do: call the pipeline through the session, `with "
                             "attnctl.apply(pipe, method, prompt=p) as session: session(p, ...)`, instead of "
                             "`pipe(p, ...)`")
        self._prepared = False

    def prepare_call(self, session, args, kwargs) -> dict:
        """The call's arguments with each image's chosen starting noise as `latents`."""
        require_call_parameters(session.pipe, self.name, ("latents", "callback_on_step_end"))
        self._prepared = False
        self.choices = []
        if self.config.candidates > 1:
            locator = ContrastLocator(session, self, args, kwargs, self.spans, who="noise choice",
                                      instead="leave noise choice out")
            kwargs, self.choices = choose_noise(session, self, args, kwargs, locator, self.config.candidates,
                                                self.config.read_fraction)
        self._prepared = True
        return kwargs


def candidate_noises(noise: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`noise` (images first) and `count - 1` permutations of each image's values: candidate j ≥ 1 permutes every
    image's values by the same fixed permutation (drawn from seed j), so an image's candidates depend on its own noise
    alone."""
    flat = noise.flatten(1)
    out = [noise]
    for j in range(1, count):
        order = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(j)).to(noise.device)
        out.append(flat[:, order].reshape(noise.shape))
    return out


def presence_score(maps: torch.Tensor) -> torch.Tensor:
    """Per image, the weakest object's mean contrast over the strongest's (maps: images × objects × h × w)."""
    strength = maps.flatten(2).mean(-1)
    return strength.min(1).values / strength.max(1).values


def choose_noise(session, controller, args, kwargs, locator: ContrastLocator, count: int,
                 read_fraction: float) -> tuple[dict, list[dict]]:
    """The call's arguments with each image's best starting noise among `count` candidates as `latents`, and per
    image the candidates' scores and the chosen one. Each candidate runs the first `read_fraction` of the steps,
    with `controller._choosing` set meanwhile (its `begin_run` lets those runs through and acts in none of them)."""
    scheduler = session.pipe.scheduler
    noise = initial_latents(session, args, kwargs)[0] / getattr(scheduler, "init_noise_sigma", 1.0)
    candidates = candidate_noises(noise, count)
    log.debug("noise choice: %d starting noises per image, the first %.0f%% of the steps each", count,
              100 * read_fraction)
    controller._choosing = True
    try:
        scores = torch.stack([_read_score(session, args, kwargs, c, locator, read_fraction) for c in candidates], 1)
    finally:
        controller._choosing = False
    best = scores.argmax(1)  # ties: the earlier candidate, the plain noise first
    chosen = torch.stack(candidates, 1)[torch.arange(len(best), device=best.device), best]
    return {**kwargs, "latents": chosen}, [{"scores": s, "chosen": j} for s, j in zip(scores.tolist(), best.tolist())]


class _Read(Exception):
    """Ends a candidate's run at its last read step, carrying its scores."""

    def __init__(self, scores):
        super().__init__("read")
        self.scores = scores


def _read_score(session, args, kwargs, latents, locator: ContrastLocator, read_fraction: float) -> torch.Tensor:
    """A candidate's score per image: run from `latents` to the end of the last read step, then read."""
    def read(pipe, i, t, tensors):
        if i == max(1, round(read_fraction * len(pipe.scheduler.timesteps))) - 1:
            raise _Read(presence_score(locator.maps(tensors["latents"], i)))
        return {}

    call = {k: v for k, v in kwargs.items() if k not in ("callback_on_step_end", "callback_on_step_end_tensor_inputs")}
    call.update(latents=latents, callback_on_step_end=read, callback_on_step_end_tensor_inputs=["latents"],
                output_type="latent")
    try:
        with _generators_kept(kwargs.get("generator")):  # the pipeline's bar shows each candidate's steps
            session.pipe(*args, **call)
    except _Read as done:
        return done.scores
    raise RuntimeError("noise choice: a candidate's run ended before its read step")


@contextlib.contextmanager
def _generators_kept(generator):
    """Within the block, the caller's generator(s) may draw; after it each is back where it was."""
    generators = [g for g in (generator if isinstance(generator, (list, tuple)) else [generator]) if g is not None]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)

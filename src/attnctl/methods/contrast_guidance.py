"""Contrast guidance: the conditional prediction pushed toward the object it shows least and away from the prompt
with its attributes on the wrong objects (an attnctl method for issue 29; no published counterpart).

    with attnctl.apply(pipe, ContrastGuidance(), prompt=prompt) as session:
        image = session(prompt, generator=generator).images[0]     # through the session, not pipe(...)

At every guided denoiser call, with c the prediction for the prompt (the conditional rows), w_i the prediction for
the prompt without object i's phrase and s_r the prediction for the prompt with the objects' modifiers moved r
places along (the modifiers of the j-th modified object given to the (j + r)-th; r = 1 … m − 1, so every object
gets another's attributes), on the same latents at the same timestep, the conditional rows become

    c + presence · (c − w_k) + binding · Σ_r (c − s_r),      k = argmin_i ‖c − w_i‖ (per image)

before the pipeline's classifier-free guidance mixes them with the unconditional rows. The first term strengthens the
object whose contribution to the prediction is weakest in this image (the contrast locator's counterfactual, read
every step: the one most at risk of being lost); the second guides away from each wrong binding of the prompt's
attributes, as a negative prompt would, but from the positive prompt's own words. A term of 0 is left out (no
forwards for it). On the built-in UNet, held out, it binds pairs far more often than the plain model (both bound
0.870 → 0.960) and leaves triples where they were; on the built-in MMDiT it lowers the seen triples (0.594 → 0.469),
whose failures are missing shapes: use it on UNets (BENCHMARKS.md, issue 29).

Cost: per guided step, (objects + modified objects − 1) extra forwards of the conditional rows, and one text encoding
per edited prompt before the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import build, check, comma_list, option
from ..control import Controller
from ..errors import UsageError
from ..roles import PARSERS, binding_groups, object_phrase
from .contrast_locator import EditedPrompts, PredictionEdit, first_output, prompt_without, with_first_output
from .targets import TARGETS_HELP, object_nouns, one_target_list


@dataclass
class ContrastGuidanceConfig:
    """Every option of contrast guidance (docs/methods.md §11)."""

    targets: list | None = option(None, "the nouns of the objects (each names one object's phrase, which the "
                                  "presence term leaves out); " + TARGETS_HELP.split("; ")[-1], parse=comma_list,
                                  flag="--targets", shown_default="the prompt's nouns")
    presence: float = option(0.5, "weight of the weakest object's contrast c − w_k (0: no presence term)", low=0,
                             high=100)
    binding: float = option(0.5, "weight of the push away from the prompt with its modifiers on other objects (0: "
                            "no binding term)", low=0, high=100)
    steps_fraction: float = option(1.0, "guide the first fraction of the steps", low=0, high=1)
    parser: str = option("auto", "how the objects' modifiers are found: spaCy's parse, the built-in rules, or spaCy "
                         "when installed", choices=PARSERS)

    cli_prefix = "cg-"  # its flags: --cg-presence, --cg-binding, ...; --targets is shared

    def __post_init__(self):
        check(self)
        self.targets = one_target_list(self.targets, "contrast guidance")


def shifted_prompts(prompt: str, modifiers: list[tuple[int, int]]) -> list[str]:
    """`prompt` with the modifier spans `modifiers` (one per object, in prompt order) moved r places along, for r =
    1 … len − 1: "a red circle and a blue square" → ["a blue circle and a red square"]."""
    texts = [prompt[a:b] for a, b in modifiers]
    out = []
    for r in range(1, len(modifiers)):
        edited = prompt
        for j in reversed(range(len(modifiers))):
            a, b = modifiers[j]
            edited = edited[:a] + texts[(j + r) % len(texts)] + edited[b:]
        out.append(edited)
    return out


class ContrastGuidance(Controller):
    """Contrast guidance as a controller: `ContrastGuidance(targets=None, config=None, **options)` with the fields of
    `ContrastGuidanceConfig`. Run the pipeline through the session (`session(prompt, ...)`)."""

    name = "contrast guidance"

    def __init__(self, targets=None, config: ContrastGuidanceConfig | None = None, **options):
        if targets is not None:
            options["targets"] = targets
        self.config = build(ContrastGuidanceConfig, config, **options)

    def attach(self, session) -> None:
        """Finds each object's phrase and modifiers; a UsageError without one prompt, with fewer than two objects, or
        (binding > 0) with fewer than two objects that have modifiers."""
        prompt, spans = object_nouns(session, self.config.targets, self.name)
        self.withouts = [prompt_without(prompt, object_phrase(prompt, span)) for span in spans] \
            if self.config.presence else []
        self.shifted = []
        if self.config.binding:
            groups = {g.noun[1:]: g for g in binding_groups(prompt, self.config.parser)}
            modified = [(groups[s].modifiers[0][1], groups[s].modifiers[-1][2]) for s in spans if s in groups]
            if len(modified) < 2:
                raise UsageError(f"contrast guidance's binding term moves the objects' modifiers among them, and "
                                 f"{prompt!r} has {len(modified)} object(s) with a modifier (such as 'a red "
                                 "circle'); give two objects modifiers, or set binding=0 (--cg-binding 0)")
            self.shifted = shifted_prompts(prompt, sorted(modified))
        self.session = session
        self.edited: EditedPrompts | None = None
        self.prediction = PredictionEdit(session)
        self._prepared = False

    def wants(self, site) -> bool:
        """No attention site: it reads the denoiser's predictions."""
        return False

    def begin_run(self) -> None:
        """Refuses a pipeline call made without the session."""
        if not self._prepared:
            raise UsageError("contrast guidance predicts for edited prompts that are encoded before the run, which a "
                             "plain pipeline call gives it no way to do: call the pipeline through the session, "
                             "`with attnctl.apply(pipe, method, prompt=p) as session: session(p, ...)`, instead of "
                             "`pipe(p, ...)`")
        self._prepared = False
        self.prediction.begin_run()

    def prepare_call(self, session, args, kwargs) -> dict:
        """Encodes the edited prompts (the prompt without each object, the prompt with its modifiers moved)."""
        texts = self.withouts + self.shifted
        self.edited = EditedPrompts(session, self, args, kwargs, lambda prompt: texts, "contrast guidance",
                                    "leave contrast guidance out") if texts else None
        self._prepared = True
        return kwargs

    def end_call(self, step, args, kwargs, output):
        """The output with its conditional rows guided (module docstring), at the guided steps."""
        rows = step.cond_rows
        if self.edited is None or rows.stop <= rows.start or step.index >= round(self.config.steps_fraction *
                                                                                 step.num_steps):
            return None
        latent_input, timestep = self.prediction.inputs(step, args, kwargs)
        guided = first_output(output).clone()
        own = self.prediction.own(args, kwargs, guided)
        cond = own(guided[rows]).float()
        edited = [own(out).float() for out in self.edited.outputs(latent_input, timestep)]
        n = len(self.withouts)
        push = torch.zeros_like(cond)
        if n:
            contrasts = torch.stack([cond - w for w in edited[:n]], 1)  # (images, objects, ...)
            weakest = contrasts.flatten(2).norm(dim=2).argmin(1)
            push = push + self.config.presence * contrasts[torch.arange(len(cond), device=cond.device), weakest]
        for s in edited[n:]:
            push = push + self.config.binding * (cond - s)
        own(guided[rows]).copy_(cond + push)  # views: the rest of a packed output stays as the model made it
        return with_first_output(output, guided)

"""The methods attnctl runs, each declared once: its name, controller and config, what it is given (target words or
a layout), which attention it reads and the built-in model it runs on by default. The command line's choices and
flags, eval's arms, the page's method buttons and option panels, the README's methods table and the package's
exports all come from `METHODS`. A new method is its own module plus one line in `METHODS`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from ..defaults import DEFAULT_JOINT_MODEL, DEFAULT_MODEL
from ..errors import UsageError
from .ast import AST, ASTConfig
from .attend_excite import AttendAndExcite, AttendExciteConfig
from .binding import Binding, BindingConfig, bound_nouns
from .contrast_guidance import ContrastGuidance, ContrastGuidanceConfig
from .layout_modulation import LayoutModulation, LayoutModulationConfig
from .noise_choice import NoiseChoice, NoiseChoiceConfig
from .regulation import Regulation, RegulationConfig
from .relocation import Relocation, RelocationConfig

PLAIN = "none"  # the plain pipeline: no method, the arm every method is paired with


@dataclass(frozen=True)
class Method:
    """One method. `given` is "targets" (the controller is built as `controller(config=...)`, the config holding
    the target words) or "layout" (`controller(layout, config)`); `reads` what it acts on ("cross": text
    cross-attention, "joint": MMDiT joint attention, "prediction": the denoiser's output alone); `builtin_model`
    the built-in model it runs on when no model is named; `batch_options` what a batch of seeds needs to give each
    image as if it ran alone; `tune_grid` the options `attnctl tune` searches by default (field name -> values);
    `choose_targets(prompt)` the target words of a targets method when none are named (default: the prompt's
    nouns); `seen` the seen eval category its options are chosen on, where not the default; `config_words(config)`
    the words a config names besides its targets (the binding method's groups), which then stand for the targets
    (none: its default choice is used)."""

    name: str
    controller: type
    config: type
    given: str
    reads: tuple[str, ...]
    builtin_model: str
    summary: str
    batch_options: dict = field(default_factory=dict)
    tune_grid: dict = field(default_factory=dict)
    choose_targets: Callable[[str], list[str]] | None = None
    seen: str | None = None
    config_words: Callable[[object], list[str]] | None = None

    @property
    def takes_layout(self) -> bool:
        """Whether the method is given a layout (else target words)."""
        return self.given == "layout"

    @property
    def seen_category(self) -> str:
        """The eval category of seen prompts on which `attnctl tune` chooses this method's options."""
        return self.seen or ("seen_placed_pairs" if self.takes_layout else "seen_pairs")

    @property
    def heldout_categories(self) -> tuple[str, ...]:
        """The held-out eval categories of what this method promises."""
        if self.takes_layout:
            return ("placed_pairs", "placed_triples", "layout")
        return ("two_objects", "colour_binding", "three_objects")

    def default_targets(self, prompt: str) -> list[str]:
        """The target words of `prompt` when none are named."""
        from .targets import choose_targets

        return self.choose_targets(prompt) if self.choose_targets else choose_targets(prompt, self.name)

    def words_of(self, config) -> list[str]:
        """The words `config` names besides its targets (`config_words`; none for most methods)."""
        return self.config_words(config) if self.config_words else []

    def build(self, config, *, targets=None, layout=None):
        """The controller for `config` (a `self.config`), given the target words or the layout it takes."""
        if self.takes_layout:
            return self.controller(layout, config)
        if targets is not None:
            config = dataclasses.replace(config, targets=list(targets))
        return self.controller(config=config)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("regulation", Regulation, RegulationConfig, "targets", ("cross",), DEFAULT_MODEL,
           "Attention Regulation (ECCV 2024): cross-attention optimised so every target word is attended, evenly",
           batch_options={"selection": "image"}, tune_grid={"strength": [0.5, 1.0, 2.0]}),
    Method("ast", AST, ASTConfig, "layout", ("joint",), DEFAULT_JOINT_MODEL,
           "AST (2025): step- and layer-wise tuning of MMDiT joint attention from an instance sketch",
           tune_grid={"strength": [0.25, 0.5, 1.0]}),
    Method("attend-excite", AttendAndExcite, AttendExciteConfig, "targets", ("cross",), DEFAULT_MODEL,
           "Attend-and-Excite (SIGGRAPH 2023): the latents moved so every target word's attention peaks",
           tune_grid={"scale_factor": [10.0, 20.0, 40.0]}),
    Method("binding", Binding, BindingConfig, "targets", ("cross", "joint"), DEFAULT_MODEL,
           "attribute binding (SynGen, NeurIPS 2023, with Attend-and-Excite's presence term): the latents moved so "
           "each modifier's attention lies on its noun's and off the other objects",
           tune_grid={"step_size": [10.0, 20.0, 40.0], "presence": [0.0, 1.0]}, choose_targets=bound_nouns,
           seen="seen_triples", config_words=lambda config: [w for g in config.groups or () for w in g.split()]),
    Method("contrast-guidance", ContrastGuidance, ContrastGuidanceConfig, "targets", ("prediction",), DEFAULT_MODEL,
           "contrast guidance (attnctl): the prediction pushed toward the object it shows least and away from the "
           "prompt with its modifiers on the wrong objects, from the denoiser's predictions for those edited prompts",
           tune_grid={"presence": [0.25, 0.5], "binding": [0.25, 0.5]}, seen="seen_triples"),
    Method("layout-modulation", LayoutModulation, LayoutModulationConfig, "layout", ("cross", "joint"),
           DEFAULT_JOINT_MODEL,
           "layout attention modulation (DenseDiffusion, ICCV 2023): image→text scores biased towards each region's "
           "phrase",
           # the published decay, and short, strong and constant (what moved objects in the probes of issue 28)
           tune_grid={"weight": [1.0, 25.0], "power": [5.0, 0.0], "steps_fraction": [0.2, 0.4]}),
    Method("noise-choice", NoiseChoice, NoiseChoiceConfig, "targets", ("prediction",), DEFAULT_JOINT_MODEL,
           "noise choice (attnctl): each image starts from the one of a few starting noises whose first steps "
           "already show every object, judged by the denoiser's own prediction without each object",
           tune_grid={"candidates": [2, 4, 8], "read_fraction": [0.2, 0.32]}, seen="seen_triples"),
    Method("relocation", Relocation, RelocationConfig, "layout", ("cross", "joint"), DEFAULT_MODEL,
           "relocation (attnctl): each object moved into its box by permuting the latents early in the run, "
           "found where its words are attended or where the prompt without it predicts otherwise",
           tune_grid={"read_fraction": [0.16, 0.24, 0.32, 0.4]}),
)}


def choices() -> tuple[str, ...]:
    """What a front end offers: the plain pipeline, then every method."""
    return (PLAIN, *METHODS)


def layout_methods() -> tuple[str, ...]:
    """The names of the methods given a layout."""
    return tuple(name for name, m in METHODS.items() if m.takes_layout)


def target_methods() -> tuple[str, ...]:
    """The names of the methods given target words."""
    return tuple(name for name, m in METHODS.items() if not m.takes_layout)


def methods_on(model: str) -> tuple[str, ...]:
    """The methods that run on the built-in `model` by default."""
    return tuple(name for name, m in METHODS.items() if m.builtin_model == model)


def method(name: str) -> Method:
    """The method called `name`; a UsageError listing the methods for any other name."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; the methods are {', '.join(METHODS)} ({PLAIN}: the plain "
                         "pipeline)")
    return METHODS[name]


def builtin_model(name: str) -> str:
    """The built-in model `name` runs on by default (the plain pipeline: the UNet one)."""
    return DEFAULT_MODEL if name == PLAIN else method(name).builtin_model


def default_targets(name: str, prompt: str) -> list[str]:
    """The words method `name` acts on (the plain pipeline: the words its maps show) when none are named."""
    from .targets import choose_targets

    return choose_targets(prompt, name) if name == PLAIN else method(name).default_targets(prompt)


def listing(names) -> str:
    """`a, b and c`: method names as a message names them."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def methods_table() -> str:
    """The README's table of methods, rendered from `METHODS`."""
    kinds = {"cross": "text cross-attention", "joint": "joint attention", "prediction": "the denoiser's prediction"}
    rows = ["| method | given | reads | built-in model | what it does |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        rows.append(f"| `{m.name}` | {'a layout' if m.takes_layout else 'target words'} | "
                    f"{', '.join(kinds[k] for k in m.reads)} | `{m.builtin_model}` | {m.summary} |")
    return "\n".join(rows)

"""The application layer: one typed `Request` and one `generate(request)`, which the command line, the page and eval
call (each only translates its own inputs into a `Request`).

    request = Request(method="regulation", prompt="a red circle and a blue square", maps=True,
                      sampling=SamplingConfig(seed=3))
    output = generate(request)            # loads (or reuses) the model, applies the method, runs, returns images
    write(output, Path("out"))            # image.png, plain.png, compare.png, maps.png, ... (attnctl.outputs)
    print(request.command())              # the `attnctl generate` command that gives the same images

A method's options are given by field name (`options={"strength": 2.0}`); the fields not given come from the model
folder's recommendations (`attnctl.json`), then the method's config defaults, as on the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import as_arguments, build, describe, flag_words, word_list
from .errors import BrokenImage, UsageError
from .layout import Layout
from .methods.registry import METHODS, PLAIN, builtin_model, choices, default_targets, layout_methods, listing
from .sampling import MAX_IMAGES, MAX_SEED, SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One generation, as every front end asks for it; checked on construction (nothing is loaded for that).

    `method`: a method's name or "none" (the plain pipeline). `prompt`: the prompt of a targets method (a layout
    method's is its layout's). `targets`: the words a targets method acts on (default: the method's choice from the
    prompt), or the words the plain pipeline's maps show. `options`: the method's options set by the person (config
    field names); the rest come from the model's recommendations, then the config's defaults. `model`: a model spec
    (default: the method's built-in model). `maps`: also the plain image of the same seed and both runs' token maps.
    `seed_grid`: also the plain pipeline and the method on seeds seed .. seed + N - 1. `seeds`: one image per seed,
    each as it would come alone (the method's batch options; eval's samples)."""

    method: str = "regulation"
    prompt: str = ""
    layout: Layout | None = None
    targets: list[str] | None = None
    options: dict = field(default_factory=dict)
    model: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    maps: bool = False
    seed_grid: int = 0
    seeds: list[int] | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in choices():
            raise UsageError(f"--method {self.method!r} is not one of {', '.join(choices())}")
        if not isinstance(self.sampling, SamplingConfig):
            raise UsageError(f"sampling must be a SamplingConfig, not {type(self.sampling).__name__}")
        if not (isinstance(self.options, dict) and all(isinstance(k, str) for k in self.options)):
            raise UsageError(f"options must map a method's option names to values, such as {{\"strength\": 2.0}}, "
                             f"not {self.options!r}")
        if self.layout is not None and not isinstance(self.layout, Layout):
            raise UsageError(f"layout must be an attnctl.Layout (Layout.load(path), Layout.from_dict(...)), not "
                             f"{type(self.layout).__name__}")
        if self.model is not None and not (isinstance(self.model, str) and self.model.strip()):
            raise UsageError(f"model must be a model spec (builtin:NAME, a hub id, a folder), not {self.model!r}")
        if not isinstance(self.maps, bool):
            raise UsageError(f"maps must be True or False, not {self.maps!r}")
        if self.seeds is not None:
            seeds = list(self.seeds) if isinstance(self.seeds, (list, tuple, range)) else []
            if not (0 < len(seeds) <= MAX_IMAGES and all(isinstance(x, int) and not isinstance(x, bool)
                                                         and 0 <= x <= MAX_SEED for x in seeds)):
                raise UsageError(f"seeds must be a list of 1 to {MAX_IMAGES} generator seeds, whole numbers from 0 to "
                                 f"{MAX_SEED}, not {self.seeds!r}")
            self.seeds = seeds
        if isinstance(self.seed_grid, bool) or not isinstance(self.seed_grid, int) or not \
                0 <= self.seed_grid <= MAX_IMAGES:
            raise UsageError(f"--seed-grid must be between 0 and {MAX_IMAGES} seeds, not {self.seed_grid!r}")
        if self.seed_grid and self.method == PLAIN:
            raise UsageError("--seed-grid compares a method with the plain pipeline: name a --method")
        if self.targets is not None:
            self.targets = word_list(self.targets, "--targets")
            if self.method == PLAIN and not self.maps:
                raise UsageError(f"--targets with --method {PLAIN} names the words of the maps: add --maps, or drop "
                                 "--targets")
        if self.method in layout_methods():
            if self.layout is None:
                raise UsageError(f"--method {self.method} needs a layout: pass --layout L.json (prompt, background "
                                 "and regions; see examples/) or --auto-layout with a --prompt that states where "
                                 "things are")
            self.prompt = self.layout.prompt
        else:
            if self.layout is not None:
                raise UsageError(f"--layout applies to --method {listing(layout_methods())} only, not --method "
                                 f"{self.method}")
            if not isinstance(self.prompt, str) or not self.prompt.strip():
                raise UsageError(f"--prompt is required with --method {self.method}")
        if self.method == PLAIN and self.options:
            raise UsageError(f"the plain pipeline (--method {PLAIN}) has no options, not "
                             f"{', '.join(map(str, self.options))}: name the method they belong to")
        if self.method in METHODS:
            build(METHODS[self.method].config, None, **self.options)  # unknown or out-of-bounds options

    @property
    def model_spec(self) -> str:
        """The model: the one named, else the method's built-in model."""
        return self.model or builtin_model(self.method)

    def config(self):
        """The method's config: its defaults, the model folder's recommendations, then `options` (None for the plain
        pipeline). Recommendations in use are logged."""
        from .models import recommended_options

        if self.method == PLAIN:
            return None
        entry = METHODS[self.method]
        recommended = {k: v for k, v in recommended_options(self.model_spec, self.method).items()
                       if k not in self.options}
        if recommended:
            _say_recommended(self.method, self.model_spec, describe(recommended))
        batch = entry.batch_options if self.seeds is not None else {}
        return build(entry.config, None, **{**batch, **recommended, **self.options})

    def controller(self):
        """The method's controller (a fresh one: a controller keeps state of its runs), or None for the plain
        pipeline."""
        config = self.config()
        if config is None:
            return None
        entry = METHODS[self.method]
        if entry.takes_layout:
            return entry.build(config, layout=self.layout)
        return entry.build(config, targets=self.method_targets(config))

    def method_targets(self, config) -> list[str] | None:
        """The words a targets method acts on: those named, else those its config names, else its default choice
        from the prompt (None where the config names its words otherwise: `Method.config_words`)."""
        if self.targets is not None:
            return self.targets
        if config.targets is not None or METHODS[self.method].words_of(config):
            return config.targets
        return default_targets(self.method, self.prompt)

    def words(self, controller) -> tuple[list[str], bool]:
        """The words the maps show for `controller` (this request's, None for the plain pipeline), and whether
        they were named (not chosen automatically)."""
        if self.method in layout_methods():
            return [region.phrase.split()[-1] for region in self.layout.regions], False  # head words
        if controller is None:
            return list(self.targets or []), True
        config = controller.config
        if config.targets is None:  # the config names its words otherwise (the binding method's groups)
            return METHODS[self.method].words_of(config), True
        return list(config.targets), self.targets is not None or self.options.get("targets") is not None

    def arguments(self, layout_file: str = "layout.json", out: str = "out") -> list[str]:
        """`attnctl generate` words that make this request, with the layout read from `layout_file`."""
        words = ["generate", "--method", self.method]
        if self.model:
            words += flag_words("--model", self.model)
        if self.method in layout_methods():
            words += flag_words("--layout", layout_file)
        else:
            words += flag_words("--prompt", self.prompt)
        if self.targets is not None:
            words += flag_words("--targets", ",".join(self.targets))
        defaults = SamplingConfig()
        words += as_arguments(SamplingConfig, {f.name: getattr(self.sampling, f.name)
                                               for f in dataclasses.fields(SamplingConfig)
                                               if getattr(self.sampling, f.name) != getattr(defaults, f.name)})
        if self.method in METHODS:
            words += as_arguments(METHODS[self.method].config, self.options)
        if self.maps:
            words.append("--maps")
        if self.seed_grid:
            words += ["--seed-grid", str(self.seed_grid)]
        return words + ["--out", out]

    def command(self, layout_file: str = "layout.json", out: str = "out") -> str:
        """The command line a person runs to get the same images."""
        return "attnctl " + shlex.join(self.arguments(layout_file, out))


class Pipelines:
    """Loaded pipelines by model, device and dtype: each is loaded once and reused; the `keep` used last stay."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._loaded: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str, sampling: SamplingConfig):
        """The pipeline of `model` on the sampling's device and dtype, loaded now if it is not."""
        from .devices import parse_dtype
        from .models import load_pipeline

        key = (model, sampling.device, sampling.dtype)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_pipeline(model, device=sampling.device, dtype=parse_dtype(sampling.dtype))
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

    def loaded(self, model: str, device: str = "cpu", dtype: str = "float32"):
        """The pipeline of `model` if it is loaded, else None."""
        return self._loaded.get((model, device, dtype))


@dataclass
class Output:
    """What `generate` made. `images`: the method's (the plain pipeline's for method "none"); `plain`: the plain
    pipeline's on the same seeds (with `maps`); `captures`: label -> (Capture, images) of the runs whose maps were
    recorded; `words`: the words mapped; `grid`: label -> images on the seed grid's `grid_seeds`, judged in
    `captions` where the shapes world's scorer can judge them; `seconds`: per image of the method's run."""

    request: Request
    images: list
    plain: list | None = None
    captures: dict = field(default_factory=dict)
    words: list[str] = field(default_factory=list)
    grid: dict = field(default_factory=dict)
    grid_seeds: list[int] = field(default_factory=list)
    captions: dict = field(default_factory=dict)
    seconds: float = 0.0


def generate(request: Request, pipelines: Pipelines | None = None,
             on_step: Callable[[str, int, int], None] | None = None, observers=()) -> Output:
    """Run `request`: its method's images, and with `maps` the plain pipeline's beside them and both runs' maps,
    with `seed_grid` both on a grid of seeds. `pipelines`: a cache to load from (default: load anew);
    `on_step(label, step, steps)` follows each run's denoising steps (label: the method's name, then "plain"); an
    exception it raises stops the run (the pipeline is restored). `observers`: controllers attached to the method's
    run as well (eval's measurements)."""
    from .methods.capture import Capture

    method = request.controller()  # bad options and words fail before the model loads
    words, named = request.words(method) if request.maps else ([], False)
    pipe = (pipelines or Pipelines(keep=1)).get(request.model_spec, request.sampling)
    capture = Capture(words, requested=named) if request.maps and words else None

    def run(label, controllers, seeds=None):
        step = (lambda i, n: on_step(label, i, n)) if on_step else None
        return pipeline_call(pipe, request.prompt, request.sampling, request.model_spec, controllers, on_step=step,
                             seeds=seeds)

    start = time.perf_counter()
    images = run(request.method, [c for c in (method, capture) if c is not None] + list(observers), request.seeds)
    output = Output(request, images, seconds=(time.perf_counter() - start) / len(images))
    if capture is not None:
        output.words, output.captures = words, {request.method: (capture, images)}
        if method is not None:
            plain_capture = Capture(words, requested=named)
            output.plain = run("plain", [plain_capture])
            output.captures = {"plain": (plain_capture, output.plain), **output.captures}
    elif request.maps:
        log.info("no target words to map; pass --targets")
    if request.seed_grid:
        output.grid_seeds = [request.sampling.seed + k for k in range(request.seed_grid)]
        output.grid = {"plain": run("plain", [], seeds=output.grid_seeds),
                       request.method: run(request.method, [request.controller()], seeds=output.grid_seeds)}
        output.captions = _judged(request, output.grid, output.grid_seeds)
    return output


@functools.cache
def _say_recommended(method: str, model: str, options: str) -> None:
    """Log a model's recommendations in use once per process (an evaluation builds a request per case)."""
    log.info("%s: %s recommends %s (flags override them)", method, model, options)


def _judged(request: Request, grid: dict, seeds: list[int]) -> dict:
    """Each seed grid image's verdict by the shapes world's exact scorer, where the model and the prompt are the
    shapes world's (a built-in model, "a COLOUR SHAPE" phrases: the prompt's, or with a layout its regions', so a
    relation prompt is judged too); blank captions elsewhere."""
    from .shapes.scorer import judged, objects_of_prompt

    regions = request.layout.regions if request.layout is not None else None
    named = request.prompt if regions is None else " and ".join(r.phrase for r in regions)
    objects = objects_of_prompt(named) if request.model_spec.startswith("builtin:") else None
    boxes = [r.box for r in regions] if regions is not None and all(r.box for r in regions) else None
    captions = {label: [judged(image, objects, boxes) if objects else "" for image in images]
                for label, images in grid.items()}
    if objects:
        good = "all placed" if boxes else "all bound"
        log.info("%s on seeds %d-%d: plain %d/%d, %s %d/%d", good, seeds[0], seeds[-1], captions["plain"].count(good),
                 len(seeds), request.method, captions[request.method].count(good), len(seeds))
    return captions


def pipeline_call(pipe, prompt, sampling: SamplingConfig, model: str, controllers=(), on_step=None, seeds=None):
    """The images of `prompt` with `controllers` attached: `num_images` from `seed`, or one per seed of `seeds`
    (image k is what seed seeds[k] draws alone, up to a batched kernel's float rounding). `model`: the spec whose
    folder's recommendations fill the settings not given. `on_step(step, steps)` is called after each denoising
    step (1-based)."""
    import torch

    from .control import apply

    kwargs = call_arguments(pipe, sampling, model)
    if seeds is None:
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    else:
        generator = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs["num_images_per_prompt"] = len(seeds)
    if on_step is not None:
        def step_end(pipe, step, timestep, tensors):
            on_step(step + 1, pipe.num_timesteps)
            return tensors

        kwargs["callback_on_step_end"] = step_end
    with apply(pipe, *controllers, prompt=prompt) as session:
        arrays = session(prompt=prompt, generator=generator, **{**kwargs, "output_type": "np"}).images
    return finite_images(arrays)


def call_arguments(pipe, sampling: SamplingConfig, model: str) -> dict:
    """The pipeline's keyword arguments: the model folder's recommended settings, then those of `sampling`; a
    UsageError for a size the model cannot make or a setting its pipeline does not take."""
    import inspect

    from .control import denoiser_of
    from .models import sampling_defaults

    kwargs = {**sampling_defaults(model), **sampling.call_arguments(), "num_images_per_prompt": sampling.num_images}
    denoiser, family = denoiser_of(pipe)
    for name in ("height", "width"):
        if name in kwargs:
            family.check_size(pipe, denoiser, f"--{name}", kwargs[name])
    if "max_sequence_length" in kwargs and "max_sequence_length" not in inspect.signature(pipe.__call__).parameters:
        raise UsageError(f"--max-sequence-length does not apply to {type(pipe).__name__} (its text length is fixed; "
                         "it applies to SD3, FLUX and other T5-text pipelines)")
    return kwargs


def finite_images(arrays) -> list:
    """The pipeline's float images as PIL images (what output_type="pil" gives); a BrokenImage error, before any
    file is written, where a value is not finite (written as a black image, it would pass for a result)."""
    import numpy as np
    from diffusers.utils import numpy_to_pil

    if not np.isfinite(arrays).all():
        bad = [i for i, a in enumerate(arrays) if not np.isfinite(a).all()]
        raise BrokenImage(f"the pipeline produced non-finite values (NaN or infinity) in image(s) {bad}: a value "
                          "too large somewhere (--guidance, or a method's strength or step size) or a float16 "
                          "overflow (try --dtype bfloat16 or float32); nothing was written")
    return numpy_to_pil(arrays)

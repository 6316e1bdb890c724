"""What several sub-commands share: the model and sampling options, loading, generating, writing images and maps,
and the methods' options (generated from their configs, with a model's recommendations)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import add_arguments, build, describe, flag_of, given_arguments
from ..errors import BrokenImage, UsageError
from ..methods.registry import METHODS
from ..models import DEFAULT_MODEL, MAX_SIDE, MAX_STEPS, MAX_TEXT


def add_model_options(parser, default_model: str) -> None:
    g = parser.add_argument_group("model and sampling")
    g.add_argument("--model", default=None,
                   help=f"builtin:NAME, a hub id or local diffusers folder, or random:SPEC (default: {default_model})")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's usual count)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 text length of SD3/FLUX pipelines (default: the pipeline's)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")


MAX_IMAGES = 64  # images per prompt in one call; more is a loop, not a batch


def bounded(flag: str, value, low: float, high: float, why: str = "") -> None:
    """A UsageError naming `flag` unless `value` (None: not given) is a finite number in [low, high]."""
    import math

    if value is not None and not (math.isfinite(value) and low <= value <= high):
        shown = [f"{x:g}" if isinstance(x, float) else str(x) for x in (low, high)]
        raise UsageError(f"{flag} must be between {shown[0]} and {shown[1]}{why}, not {value}")


def check_sampling(args) -> None:
    """The model and sampling options, before any model is loaded: ranges, finiteness and limits, each with the
    flag that is wrong."""
    import math

    bounded("--seed", args.seed, 0, 2**64 - 1, " (a 64-bit generator seed)")
    bounded("--steps", args.steps, 1, MAX_STEPS, " (schedulers have 1000 training timesteps)")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        bounded(flag, value, 8, MAX_SIDE, " pixels")
    bounded("--num-images", args.num_images, 1, MAX_IMAGES, " images per prompt")
    bounded("--max-sequence-length", args.max_sequence_length, 1, MAX_TEXT, " tokens")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UsageError(f"--guidance must be a finite number >= 0 (1 or less turns guidance off), not {args.guidance}")
    check_device(args.device)
    out = getattr(args, "out", None)
    if out is not None and (str(out) == "" or out.exists() and not out.is_dir()):
        raise UsageError(f"--out {str(out)!r} must be a folder (it is created if missing), not an existing file "
                         "or an empty name")


def check_device(name: str):
    """The torch device `--device` names, if this machine has it (`models.checked_device`)."""
    from ..models import checked_device

    return checked_device(name, "--device")


def add_method_options(parser, name: str) -> None:
    entry = METHODS[name]
    add_arguments(parser, entry.config, title=f"{name} options")


def method_config(name: str, args, model: str):
    """The method's config: its defaults, then what the model folder recommends (`attnctl.json`), then the flags
    given. Recommendations in use are printed."""
    from ..models import recommended_options

    entry = METHODS[name]
    given = given_arguments(entry.config, args)
    recommended = {k: v for k, v in recommended_options(model, name).items() if k not in given}
    if recommended:
        print(f"attnctl: {name}: {model} recommends {describe(recommended)} (flags override them)")
    return build(entry.config, None, **{**recommended, **given})


def given_method_flags(args, name: str) -> list[str]:
    """The flags of method `name` that were given (to refuse them with another method)."""
    entry = METHODS[name]
    return [flag_of(entry.config, name) for name in given_arguments(entry.config, args)]


def call_kwargs(args, pipe) -> dict:
    from ..models import sampling_defaults

    kwargs = {**sampling_defaults(args.model), "num_images_per_prompt": args.num_images}
    for name, key in (("steps", "num_inference_steps"), ("guidance", "guidance_scale"), ("height", "height"),
                      ("width", "width"), ("max_sequence_length", "max_sequence_length")):
        if getattr(args, name) is not None:
            kwargs[key] = getattr(args, name)
    for name in ("height", "width"):
        multiple = getattr(pipe, "vae_scale_factor", 8) * (2 if hasattr(pipe, "transformer") else 1)
        if name in kwargs and kwargs[name] % multiple:
            raise UsageError(f"--{name} {kwargs[name]} must be a multiple of {multiple} for this model")
    if "max_sequence_length" in kwargs and not hasattr(pipe, "transformer"):
        raise UsageError("--max-sequence-length applies to SD3 and FLUX pipelines only (UNet models use 77 tokens)")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    return kwargs


def resolve_model(args, default: str) -> str:
    """--model, or `default` (the built-in model of the method that runs: `registry.builtin_model`)."""
    args.model = args.model or default
    return args.model


def load(args, default: str = DEFAULT_MODEL):
    """The pipeline of --model (or `default`), after the sampling options are checked."""
    from ..models import load_pipeline, parse_dtype

    check_sampling(args)
    return load_pipeline(resolve_model(args, default), device=args.device, dtype=parse_dtype(args.dtype))


def generate(pipe, prompt, args, controllers=(), on_step=None, seeds=None):
    """The images of `prompt` with `controllers` attached: `--num-images` from `--seed`, or one per seed of `seeds`.
    `on_step(step, steps)`, if given, is called after each denoising step (1-based); an exception it raises stops
    the run (the pipeline is restored)."""
    import torch

    from ..control import apply

    kwargs = call_kwargs(args, pipe)
    if seeds is None:
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
    else:  # one generator per image: image k is what --seed seeds[k] draws alone
        generator = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs["num_images_per_prompt"] = len(seeds)
    if on_step is not None:
        def step_end(pipe, step, timestep, tensors):
            on_step(step + 1, pipe.num_timesteps)
            return tensors

        kwargs["callback_on_step_end"] = step_end
    with apply(pipe, *controllers, prompt=prompt) as session:
        arrays = session(prompt, generator=generator, **{**kwargs, "output_type": "np"}).images
    return finite_images(arrays, args)


def finite_images(arrays, args) -> list:
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


def save_images(images, out: Path, stem: str = "image") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / (f"{stem}.png" if len(images) == 1 else f"{stem}_{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def write_maps(captures: dict[str, tuple], words, out: Path, stem: str, title: str) -> list[Path]:
    """`captures`: label -> (Capture, images). Writes STEM.safetensors (raw maps of every label) and STEM.png (one
    figure per image, the labels' rows side by side per resolution or depth group); returns the paths written."""
    from safetensors.torch import save

    from ..viz import maps_figure

    tensors = {}
    for label, (capture, _) in captures.items():
        prefix = f"{label}/" if len(captures) > 1 else ""
        tensors.update({f"{prefix}site/{name}": m.contiguous() for name, m in capture.maps().items()})
        tensors.update({f"{prefix}group/{g}": m.contiguous() for g, m in capture.grouped().items()})
    # written as bytes, so the file gets the usual permissions (save_file makes it owner-only)
    paths = [out / f"{stem}.safetensors"]
    paths[0].write_bytes(save(tensors, metadata={"words": json.dumps(words)}))
    grouped = {label: capture.grouped() for label, (capture, _) in captures.items()}
    n_images = len(next(iter(captures.values()))[1])
    for i in range(n_images):
        rows = {}
        for group in next(iter(grouped.values())):
            for label, (_, images) in captures.items():
                rows[f"{label} · {group}" if len(captures) > 1 else group] = (images[i], grouped[label][group][i])
        paths.append(out / (f"{stem}.png" if i == 0 else f"{stem}_{i}.png"))
        maps_figure(rows, words, paths[-1], title=title)
    return paths


def print_written(paths, out: Path) -> None:
    """The files a sub-command wrote, one path per line after a count: the last lines of its output."""
    print(f"wrote {len(paths)} file(s) to {out}:")
    for path in paths:
        print(path)

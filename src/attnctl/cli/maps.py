"""`attnctl maps`: an image and the attention maps of chosen words."""

from __future__ import annotations

from pathlib import Path

from ..config import build
from ..errors import UsageError
from ..methods.capture import Capture, CaptureConfig
from ..outputs import save_images, write_maps
from ..run import pipeline_call
from .common import add_model_options, load, print_written, sampling_of
from .flags import add_arguments, given_arguments


def register(sub) -> None:
    """Adds the `attnctl maps` parser."""
    from ..defaults import DEFAULT_MODEL

    p = sub.add_parser("maps", help="generate an image and the attention maps of chosen words")
    add_model_options(p, DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, type=Path)
    add_arguments(p, CaptureConfig, title="maps")
    p.set_defaults(func=run)


def run(args) -> None:
    """Generates the image with `Capture` attached and writes it and the maps of the captured words to --out."""
    capture = Capture(config=build(CaptureConfig, None, **given_arguments(CaptureConfig, args)))
    pipe = load(args)
    sampling = sampling_of(args)
    images = pipeline_call(pipe, args.prompt, sampling, args.model, [capture])
    if not capture.sums:
        raise UsageError(f"--map-steps selects none of the {sampling.steps or 'default'} steps run")
    written = save_images(images, args.out)
    written += write_maps({"": (capture, images)}, capture.words, args.out, "maps", args.prompt)
    print_written(written, args.out)

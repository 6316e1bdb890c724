"""`attnctl sites`: a model's attention sites as a table."""

from __future__ import annotations


def register(sub) -> None:
    """Adds the `attnctl sites` parser."""
    from ..defaults import DEFAULT_MODEL

    p = sub.add_parser("sites", help="list a model's attention sites")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.set_defaults(func=run)


def run(args) -> None:
    """Prints the model's attention sites with their token grids at --height x --width (default: the denoiser's
    sample size)."""
    from ..control import Session
    from ..errors import UsageError
    from ..models import load_pipeline
    from ..sites import site_table

    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not 8 <= value <= 4096:
            raise UsageError(f"{flag} must be between 8 and 4096 pixels, not {value}")
    pipe = load_pipeline(args.model)
    session = Session(pipe, [])
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(session.denoiser.config, "sample_size", None) or 64  # absent or None in some configs
    height, width = args.height or sample * scale, args.width or sample * scale
    for flag, value in (("--height", height), ("--width", width)):
        session.family.check_size(pipe, session.denoiser, flag, value)  # as generate refuses it
    multiple = session.family.size_multiple(pipe, session.denoiser)  # pixels per token
    grid = (height // multiple, width // multiple)
    print(f"{args.model}: {len(session.sites)} attention sites ({session.family.name}), token grids at "
          f"{height}x{width}")
    print(site_table(session.sites, grid))

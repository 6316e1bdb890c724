"""What several sub-commands share: the model and sampling flags (from `SamplingConfig`), the methods' flags (from
their configs), the checks of --out, loading a model, and the list of files written."""

from __future__ import annotations

from pathlib import Path

from ..config import build, flag_of
from ..defaults import DEFAULT_MODEL
from ..errors import UsageError
from ..methods.registry import METHODS
from ..sampling import SamplingConfig
from .flags import add_arguments, given_arguments


def add_model_options(parser, default_model: str) -> None:
    """--model and the sampling flags (`SamplingConfig`'s fields)."""
    g = parser.add_argument_group("model and sampling")
    g.add_argument("--model", default=None,
                   help=f"builtin:NAME, a hub id or local diffusers folder, or random:SPEC (default: {default_model})")
    add_arguments(g, SamplingConfig)


def sampling_of(args) -> SamplingConfig:
    """The sampling flags given, as a checked SamplingConfig (the same bounds on every front end)."""
    return build(SamplingConfig, None, **given_arguments(SamplingConfig, args))


def bounded(flag: str, value, low: float, high: float, why: str = "") -> None:
    """A UsageError naming `flag` unless `value` (None: not given) is a finite number in [low, high]."""
    import math

    if value is not None and not (math.isfinite(value) and low <= value <= high):
        shown = [f"{x:g}" if isinstance(x, float) else str(x) for x in (low, high)]
        raise UsageError(f"{flag} must be between {shown[0]} and {shown[1]}{why}, not {value}")


def check_out(out) -> None:
    """--out names a folder (created if missing), not an existing file or an empty name."""
    from ..models import exists

    if out is not None and (str(out) == "" or exists(out, what="--out") and not exists(out, "dir", "--out")):
        raise UsageError(f"--out {str(out)!r} must be a folder (it is created if missing), not an existing file "
                         "or an empty name")


def add_method_options(parser, name: str) -> None:
    """The flags of method `name` (its config's fields), in a group titled "NAME options"."""
    entry = METHODS[name]
    add_arguments(parser, entry.config, title=f"{name} options")


def given_method_flags(args, name: str) -> list[str]:
    """The flags of method `name` that were given (to refuse them with another method)."""
    entry = METHODS[name]
    return [flag_of(entry.config, name) for name in given_arguments(entry.config, args)]


def load(args, default: str = DEFAULT_MODEL):
    """The pipeline of --model (or `default`), after the sampling options are checked."""
    from ..run import Pipelines

    check_out(getattr(args, "out", None))
    return Pipelines(keep=1).get(resolve_model(args, default), sampling_of(args))


def resolve_model(args, default: str) -> str:
    """--model, or `default` (the built-in model of the method that runs: `registry.builtin_model`)."""
    args.model = args.model or default
    return args.model


def print_written(paths, out: Path) -> None:
    """The files a sub-command wrote, one path per line after a count: the last lines of its output."""
    print(f"wrote {len(paths)} file(s) to {out}:")
    for path in paths:
        print(path)

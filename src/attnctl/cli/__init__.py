"""The `attnctl` command line: one module per sub-command, each with `register(subparsers)` that adds its parser
and sets `func`, the function `main` calls with the parsed arguments."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ..errors import BrokenImage, UsageError
from . import analyze, app, bench, evaluate, generate, maps, shapes, sites, tune

SUBCOMMANDS = (sites, maps, generate, analyze, bench, evaluate, tune, shapes, app)


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are UsageErrors (printed as one `attnctl: error:` line, exit 2), not a usage text and
    an exit of its own."""

    def error(self, message):
        raise UsageError(f"{message} (`{self.prog} --help` lists the options)")


def build_parser() -> argparse.ArgumentParser:
    """The `attnctl` parser; a bad command line raises UsageError."""
    parser = _Parser(prog="attnctl", description="Training-free attention control for diffusers pipelines: "
                     "Attention Regulation, AST, token maps, analysis.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


class _Messages(logging.Handler):
    """The library's log records, printed as `attnctl: ...` (warnings as `attnctl: warning: ...`)."""

    def emit(self, record):
        prefix = "attnctl: warning: " if record.levelno >= logging.WARNING else "attnctl: "
        print(prefix + record.getMessage(), file=sys.stderr)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # loading bars; the denoising bar is the pipeline's own
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    """Run `attnctl ARGS`; returns the exit status: 0, 2 for bad input (with a message naming the fix), 3 for settings
    that broke the image (non-finite values; nothing written), 1 for a bug.
    Warnings and the library's log records are printed as `attnctl: ...` while it runs (restored afterwards).

        attnctl.cli.main(["sites", "--model", "random:sd15-tiny"])
    """
    logger, handler = logging.getLogger("attnctl"), _Messages()
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = lambda message, *a, **k: print(f"attnctl: warning: {message}", file=sys.stderr)
            return _run(argv)
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


def _run(argv) -> int:
    try:
        _quiet_libraries()
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        alone = next((w for w in argv if w.startswith("--") and w.endswith("=--")), None)
        if alone is not None:  # argparse reads a bare "--" as "end of options" and gives the option an empty list
            raise UsageError(f"{alone[:-3]} needs a value, not '--' (which ends the options)")
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit:  # --help has printed the usage
            return int(exit.code or 0)
        args.command_line = "attnctl " + " ".join(argv)
        args.func(args)
        return 0
    except BrokenImage as err:
        print(f"attnctl: error: {err}", file=sys.stderr)
        return 3
    except UsageError as err:
        print(f"attnctl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnctl: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: say so briefly; the traceback on request
        if os.environ.get("ATTNCTL_DEBUG"):
            raise
        print(f"attnctl: internal error: {type(err).__name__}: {err} (set ATTNCTL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1

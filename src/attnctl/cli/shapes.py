"""`attnctl shapes train`: train a shapes-world pipeline (`attnctl.shapes.train`)."""

from __future__ import annotations

import argparse

from ..config import build
from ..shapes.train import TrainConfig
from .flags import add_arguments, given_arguments


def register(sub) -> None:
    """Adds the `attnctl shapes` parser and its `train` sub-command."""
    shapes = sub.add_parser("shapes", help="the synthetic shapes world: train its tiny models")
    shapes_sub = shapes.add_subparsers(dest="shapes_command", metavar="{train}", required=True)
    train = shapes_sub.add_parser(
        "train",
        help="train a shapes-world pipeline (StableDiffusion or SD3 family)",
        description="Train the VAE (unless --vae or --init gives one) and then the denoiser and text encoder(s) "
        "for --steps in all, at most --minutes in this run, writing a diffusers pipeline folder to OUT/pipeline "
        "and the training state to OUT/state.pt (every --checkpoint-minutes and at the end); --resume goes on.",
    )
    add_arguments(train, TrainConfig)
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """The flags as a checked `TrainConfig` (ranges, `--stop-at` within `--steps`, the device; the folders,
    OUT/state.pt and the rest in `shapes.train.check_arguments`), each a UsageError naming the flag, then the
    training."""
    from ..shapes.train import run_training

    run_training(build(TrainConfig, None, **given_arguments(TrainConfig, args)))

"""``attnctl shapes ...`` sub-commands (argparse). Wire with ``add_shapes_parser(subparsers)``."""

from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=["unet", "mmdit"], required=True)
    p.add_argument("--out", default=None, help="output folder (default: ./shapes-<family>-run)")
    p.add_argument("--minutes", type=float, default=80.0,
                   help="wall-clock budget of this run, VAE included; a checkpoint is written when it runs out")
    p.add_argument("--steps", type=int, default=6000,
                   help="denoiser steps in all, over every resumed run; the learning-rate schedule follows them")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/state.pt (weights, EMA, optimiser, step) if it exists")
    p.add_argument("--init", default=None,
                   help="start from a pipeline folder or builtin:NAME (its VAE, and every tensor whose shape "
                        "matches)")
    p.add_argument("--vae-minutes", type=float, default=None, help="VAE share of the budget (default 12%%)")
    p.add_argument("--vae", default=None,
                   help="reuse a trained VAE (its folder, a pipeline folder or builtin:NAME) instead of training one")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--vae-threads", type=int, default=None, help="torch CPU threads while the VAE trains")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--scenes", type=int, default=24_000, help="training scenes encoded once")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)


def _train(args: argparse.Namespace) -> int:
    from .train import run_training

    run_training(args)
    return 0


def add_shapes_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``shapes`` (with ``shapes train``) on an ``add_subparsers()`` object.

    Each leaf parser sets ``func``; the main CLI calls ``args.func(args)`` and returns its value.
    """
    shapes = subparsers.add_parser("shapes", help="the synthetic shapes world: train its tiny models")
    sub = shapes.add_subparsers(dest="shapes_command", metavar="{train}")
    sub.required = True
    train = sub.add_parser(
        "train",
        help="train a shapes-world pipeline from scratch (StableDiffusion or SD3 family)",
        description="Train the VAE (unless --vae is given) and then the denoiser and text encoder(s) "
        "within --minutes, writing a diffusers pipeline folder to OUT/pipeline "
        "(checkpointed every --checkpoint-minutes).",
    )
    add_train_arguments(train)
    train.set_defaults(func=_train)
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnctl")
    add_shapes_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""`attnctl shapes train`: train a shapes-world pipeline (`attnctl.shapes.train`)."""

from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=["unet", "mmdit"], required=True)
    p.add_argument("--out", default=None, help="output folder (default: ./shapes-<family>-run)")
    p.add_argument("--minutes", type=float, default=80.0,
                   help="wall-clock budget of this run, VAE included; a checkpoint is written when it runs out")
    p.add_argument("--steps", type=int, default=6000,
                   help="denoiser steps in all, over every resumed run; the learning-rate schedule follows them")
    p.add_argument("--stop-at", type=int, default=None,
                   help="end this run at this step (checkpointed; --resume continues with the same schedule)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/state.pt (weights, EMA, optimiser, step) if it exists")
    p.add_argument("--init", default=None,
                   help="start from a pipeline folder or builtin:NAME (its VAE, and every tensor whose shape "
                        "matches)")
    p.add_argument("--vae-minutes", type=float, default=None, help="VAE share of the budget (default 12%%)")
    p.add_argument("--vae", default=None,
                   help="reuse a trained VAE (its folder, a pipeline folder or builtin:NAME) instead of training one")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--vae-threads", type=int, default=None, help="torch CPU threads while the VAE trains")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--scenes", type=int, default=24_000, help="training scenes encoded once")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)


def register(sub) -> None:
    shapes = sub.add_parser("shapes", help="the synthetic shapes world: train its tiny models")
    shapes_sub = shapes.add_subparsers(dest="shapes_command", metavar="{train}", required=True)
    train = shapes_sub.add_parser(
        "train",
        help="train a shapes-world pipeline (StableDiffusion or SD3 family)",
        description="Train the VAE (unless --vae or --init gives one) and then the denoiser and text encoder(s) "
        "for --steps in all, at most --minutes in this run, writing a diffusers pipeline folder to OUT/pipeline "
        "and the training state to OUT/state.pt (every --checkpoint-minutes and at the end); --resume goes on.",
    )
    add_train_arguments(train)
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..shapes.train import run_training
    from .common import bounded, check_device

    for flag, value, low, high in (("--steps", args.steps, 1, 10**7), ("--stop-at", args.stop_at, 1, 10**7),
                                   ("--batch", args.batch, 1, 4096), ("--scenes", args.scenes, 1, 10**7),
                                   ("--threads", args.threads, 1, 1024), ("--vae-threads", args.vae_threads, 1, 1024),
                                   ("--minutes", args.minutes, 0.01, 10**6), ("--lr", args.lr, 1e-9, 1.0),
                                   ("--checkpoint-minutes", args.checkpoint_minutes, 0.01, 10**6),
                                   ("--seed", args.seed, 0, 2**32 - 1),
                                   ("--vae-minutes", args.vae_minutes, 0.01, 10**6)):
        bounded(flag, value, low, high)
    check_device(args.device)
    run_training(args)

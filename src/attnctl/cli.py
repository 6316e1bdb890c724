"""The `attnctl` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import UsageError

# method name -> module providing add_cli_arguments(parser) and controller_from_args(args, prompt)
METHODS = {"regulation": "attnctl.methods.regulation", "ast": "attnctl.methods.ast"}
BENCHES = ("capture", "regulation", "ast")


def _method_module(name: str):
    try:
        return importlib.import_module(METHODS[name])
    except ImportError as err:
        raise UsageError(f"the method {name!r} is not available in this installation ({err})") from None


def _common(p: argparse.ArgumentParser, default_model: str) -> None:
    g = p.add_argument_group("model and sampling")
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


def _words(text: str | None) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def _steps(text: str | None) -> list[int] | None:
    """'0-9' or '0,5,10' -> step indices."""
    if not text:
        return None
    steps = []
    try:
        for part in text.split(","):
            a, sep, b = part.partition("-")
            steps += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise UsageError(f"--map-steps {text!r}: write steps as 0-9 or 0,5,10") from None
    return steps


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="attnctl", description=__doc__ + " Training-free attention control for "
                                     "diffusers pipelines: Attention Regulation, AST, token maps, analysis.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sites", help="list a model's attention sites")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)

    p = sub.add_parser("maps", help="generate an image and the attention maps of chosen words")
    _common(p, DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    p.add_argument("--words", required=True, help="comma-separated words of the prompt; word#2 for a repeat")
    p.add_argument("--map-steps", default=None, help="steps to average, e.g. 0-9 or 0,5,10 (default: all)")
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("generate", help="generate images with an attention-control method")
    _common(p, DEFAULT_MODEL)
    p.add_argument("--method", choices=["none", *METHODS], default="regulation")
    p.add_argument("--prompt", default=None, help="the prompt (AST takes it from the layout)")
    p.add_argument("--maps", action="store_true",
                   help="also write the token maps of the targets with and without the method (same seed)")
    p.add_argument("--out", required=True, type=Path)
    for name in METHODS:
        try:
            _method_module(name).add_cli_arguments(p.add_argument_group(f"{name} options"))
        except UsageError:
            pass

    try:
        analysis = importlib.import_module("attnctl.analysis")
        p = sub.add_parser("analyze", help="layer-wise hierarchy analysis of joint attention for a layout")
        _common(p, "builtin:shapes-mmdit")
        p.add_argument("--out", required=True, type=Path)
        analysis.add_cli_arguments(p)
    except ImportError:
        pass

    p = sub.add_parser("bench", help="time and memory of a method against the plain pipeline, side by side")
    p.add_argument("what", choices=BENCHES)
    p.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu")

    try:
        importlib.import_module("attnctl.shapes.cli").add_shapes_parser(sub)
    except ImportError:
        pass
    try:
        importlib.import_module("attnctl.eval").add_eval_parser(sub)
    except ImportError:
        pass
    return parser


def _call_kwargs(args, pipe) -> dict:
    from .models import sampling_defaults

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


def _load(args, joint: bool = False):
    """The pipeline of --model; without it the built-in UNet model, or the MMDiT one when `joint` attention is
    needed."""
    from .models import DEFAULT_JOINT_MODEL, DEFAULT_MODEL, load_pipeline, parse_dtype

    args.model = args.model or (DEFAULT_JOINT_MODEL if joint else DEFAULT_MODEL)
    return load_pipeline(args.model, device=args.device, dtype=parse_dtype(args.dtype))


def _generate(pipe, prompt, args, controllers=()):
    import torch

    from .control import apply

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with apply(pipe, *controllers, prompt=prompt):
        return pipe(prompt, generator=generator, **_call_kwargs(args, pipe)).images


def _save_images(images, out: Path, stem: str = "image") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / (f"{stem}.png" if len(images) == 1 else f"{stem}_{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def _write_maps(captures: dict[str, tuple], words, out: Path, stem: str, title: str) -> None:
    """`captures`: label -> (Capture, images). Writes STEM.safetensors (raw maps of every label) and STEM.png (one
    figure per image, the labels' rows side by side per resolution or depth group)."""
    from safetensors.torch import save_file

    from .viz import maps_figure

    tensors = {}
    for label, (capture, _) in captures.items():
        prefix = f"{label}/" if len(captures) > 1 else ""
        tensors.update({f"{prefix}site/{name}": m.contiguous() for name, m in capture.maps().items()})
        tensors.update({f"{prefix}group/{g}": m.contiguous() for g, m in capture.grouped().items()})
    save_file(tensors, str(out / f"{stem}.safetensors"), metadata={"words": json.dumps(words)})
    grouped = {label: capture.grouped() for label, (capture, _) in captures.items()}
    n_images = len(next(iter(captures.values()))[1])
    for i in range(n_images):
        rows = {}
        for group in next(iter(grouped.values())):
            for label, (_, images) in captures.items():
                rows[f"{label} · {group}" if len(captures) > 1 else group] = (images[i], grouped[label][group][i])
        maps_figure(rows, words, out / (f"{stem}.png" if i == 0 else f"{stem}_{i}.png"), title=title)


def cmd_sites(args):
    from .control import Session
    from .models import load_pipeline
    from .sites import site_table

    pipe = load_pipeline(args.model)
    session = Session(pipe, [])
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(session.denoiser.config, "sample_size", 64)
    height, width = args.height or sample * scale, args.width or sample * scale
    patch = getattr(session.denoiser.config, "patch_size", 1) or 1
    if session.family.name == "flux":
        patch = 2  # FLUX packs 2x2 latent patches into one token
    grid = (height // scale // patch, width // scale // patch)
    print(f"{args.model}: {len(session.sites)} attention sites ({session.family.name}), token grids at "
          f"{height}x{width}")
    print(site_table(session.sites, grid))


def cmd_maps(args):
    from .methods.capture import Capture

    words = _words(args.words)
    pipe = _load(args)
    capture = Capture(words, steps=_steps(args.map_steps))
    images = _generate(pipe, args.prompt, args, [capture])
    if not capture.sums:
        raise UsageError(f"--map-steps {args.map_steps} selects none of the {args.steps or 'default'} steps run")
    _save_images(images, args.out)
    _write_maps({"": (capture, images)}, words, args.out, "maps", args.prompt)
    print(f"wrote {args.out}/image.png, maps.png, maps.safetensors")


def cmd_generate(args):
    from .methods.capture import Capture

    if args.method == "none":
        if not args.prompt:
            raise UsageError("--prompt is required with --method none")
        method, prompt = None, args.prompt
    elif args.method == "ast":
        method = _method_module("ast").controller_from_args(args)
        prompt = method.prompt
    else:
        if not args.prompt:
            raise UsageError("--prompt is required with --method regulation")
        prompt = args.prompt
        method = _method_module(args.method).controller_from_args(args, prompt)
    pipe = _load(args, joint=args.method == "ast")  # after the method's inputs are checked: cheap errors first
    controllers = [method] if method else []
    if args.method == "ast":  # map the head word (last word) of each region's phrase
        words = [region.phrase.split()[-1] for region in method.layout.regions]
    else:
        words = list(getattr(method, "target_words", None) or _words(getattr(args, "targets", None)))
    capture = Capture(words) if args.maps and words else None
    images = _generate(pipe, prompt, args, controllers + ([capture] if capture else []))
    paths = _save_images(images, args.out)
    if args.method == "ast":
        from .layout import overlay

        for image, path in zip(images, paths):
            overlay(image, method.layout).save(path.with_name(path.stem + "_layout.png"))
    if capture:
        captures = {args.method: (capture, images)}
        if method is not None:
            plain_capture = Capture(words)
            plain = _generate(pipe, prompt, args, [plain_capture])
            _save_images(plain, args.out, "plain")
            captures = {"plain": (plain_capture, plain), **captures}
        _write_maps(captures, words, args.out, "maps", prompt)
    elif args.maps:
        print("attnctl: no target words to map; pass --targets", file=sys.stderr)
    print(f"wrote {len(paths)} image(s) to {args.out}")


def cmd_analyze(args):
    from . import analysis

    from .layout import Layout

    Layout.load(args.layout)  # a bad layout fails before the model loads
    pipe = _load(args, joint=True)
    analysis.run_from_args(args, pipe, _call_kwargs(args, pipe))


def cmd_bench(args):
    module = importlib.import_module(f"attnctl.bench.{args.what}")
    results = module.run(quick=args.quick, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"{args.what}: time ratio {results['time_ratio']:.3f}, peak memory ratio "
              f"{results['peak_memory_ratio']:.3f} (method / plain pipeline)")


COMMANDS = {"sites": cmd_sites, "maps": cmd_maps, "generate": cmd_generate, "analyze": cmd_analyze,
            "bench": cmd_bench}


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # loading bars; the denoising bar is the pipeline's own
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.showwarning = lambda message, *a, **k: print(f"attnctl: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    try:
        _quiet_libraries()
        args = build_parser().parse_args(argv)
        handler = COMMANDS.get(args.command) or getattr(args, "handler", None) or getattr(args, "func")
        handler(args)
        return 0
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


if __name__ == "__main__":
    sys.exit(main())

"""`attnctl generate`: images with an attention-control method; with --maps also the plain pipeline's image (same
seed) beside it (compare.png) and the maps of the method's words with and without it (maps.png)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import given_arguments
from ..errors import UsageError
from ..methods.capture import Capture
from ..methods.registry import METHODS, PLAIN, builtin_model, choices, default_targets, layout_methods, listing
from .common import (
    MAX_IMAGES,
    add_method_options,
    add_model_options,
    bounded,
    generate,
    given_method_flags,
    load,
    method_config,
    print_written,
    resolve_model,
    save_images,
    write_maps,
)

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..models import DEFAULT_MODEL

    p = sub.add_parser("generate", help="generate images with an attention-control method")
    add_model_options(p, DEFAULT_MODEL)
    p.add_argument("--method", choices=choices(), default="regulation",
                   help=f"the method ({PLAIN}: the plain pipeline; the README's methods table says what each does)")
    p.add_argument("--prompt", default=None,
                   help=f"the prompt ({listing(layout_methods())} take it from the layout, or with --auto-layout "
                        "read the layout from it)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--layout", default=None,
                        help=f"{listing(layout_methods())}: layout JSON with prompt, background and regions (see "
                             "attnctl.layout)")
    layout.add_argument("--auto-layout", action="store_true",
                        help=f"{listing(layout_methods())}: the layout the --prompt states (\"A to the left of B\", "
                             "\"A, B and C from left to right\"; attnctl.relations lists the patterns)")
    p.add_argument("--maps", action="store_true",
                   help="also write the token maps of the targets with and without the method (same seed)")
    p.add_argument("--seed-grid", type=int, default=0, metavar="N",
                   help="also run the plain pipeline and the method on seeds SEED .. SEED+N-1 and write them side by "
                        "side (seeds.png, seeds.csv), each image judged by the shapes world's exact scorer where the "
                        "model and prompt are the shapes world's")
    p.add_argument("--out", required=True, type=Path)
    for name in METHODS:
        add_method_options(p, name)
    p.set_defaults(func=main)


def _refuse_other_methods(args) -> None:
    own = set(given_method_flags(args, args.method)) if args.method in METHODS else {"--targets"}  # none: the maps'
    for name in METHODS:
        flags = [f for f in given_method_flags(args, name) if f not in own]
        if name != args.method and flags:
            raise UsageError(f"{', '.join(flags)} belong to --method {name}, not --method {args.method}")


def _controller(args):
    """The method's controller, its prompt, the words to map and whether they were named (not chosen automatically);
    checked before the model loads."""
    from ..methods.regulation import RegulationConfig

    if args.method in layout_methods():
        from ..layout import Layout

        if args.auto_layout:
            if not args.prompt:
                raise UsageError("--auto-layout reads the layout from --prompt: pass --prompt \"a red circle to the "
                                 "left of a blue square\"")
            layout = Layout.from_prompt(args.prompt)
        elif args.prompt:
            raise UsageError(f"--prompt does not apply to --method {args.method} by itself: the prompt is the "
                             "layout's (--layout L.json), or pass --auto-layout to read the layout from the prompt")
        elif not args.layout:
            raise UsageError(f"--method {args.method} needs a layout: pass --layout L.json (prompt, background and "
                             "regions; see examples/) or --auto-layout with a --prompt that states where things are")
        else:
            layout = Layout.load(args.layout)
        tuned = given_arguments(METHODS["ast"].config, args).get("tuned_steps")
        if tuned is not None and args.steps is not None and tuned > args.steps:
            raise UsageError(f"--ast-tuned-steps {tuned} is more than the {args.steps} denoising steps (--steps); "
                             f"pass at most {args.steps} (all steps tuned) or more --steps")
        config = method_config(args.method, args, resolve_model(args, builtin_model(args.method)))
        method = METHODS[args.method].build(config, layout=layout)
        return method, layout.prompt, [region.phrase.split()[-1] for region in layout.regions], False  # head words
    if args.layout or args.auto_layout:
        flag = "--layout" if args.layout else "--auto-layout"
        raise UsageError(f"{flag} applies to --method {listing(layout_methods())} only, not --method {args.method}")
    if not args.prompt:
        raise UsageError(f"--prompt is required with --method {args.method}")
    if args.method == PLAIN:
        return None, args.prompt, list(given_arguments(RegulationConfig, args).get("targets") or []), True
    config = method_config(args.method, args, resolve_model(args, builtin_model(args.method)))
    named = config.targets is not None
    if not named and getattr(config, "groups", None):  # the binding method's groups name the words themselves
        return METHODS[args.method].build(config), args.prompt, [w for g in config.groups for w in g.split()], True
    targets = config.targets if named else default_targets(args.method, args.prompt)
    return METHODS[args.method].build(config, targets=targets), args.prompt, list(targets), named


def main(args) -> None:
    print_written(run(args), args.out)


def run(args, load_pipeline=load, on_step=None) -> list[Path]:
    """Generate as the command line says and write the files; returns their paths (the app calls this too).
    `load_pipeline(args, default_model)` gives the pipeline (the app passes its cache); `on_step(label, step, steps)`
    follows each run's denoising steps (label: the method's name, then "plain" for the comparison)."""
    _refuse_other_methods(args)
    bounded("--seed-grid", args.seed_grid, 0, MAX_IMAGES, " seeds")
    if args.seed_grid and args.method == PLAIN:
        raise UsageError("--seed-grid compares a method with the plain pipeline: name a --method")
    method, prompt, words, named = _controller(args)
    pipe = load_pipeline(args, builtin_model(args.method))  # after the method's inputs: cheap errors first
    capture = Capture(words, requested=named) if args.maps and words else None

    def run_images(label, controllers, seeds=None):
        step = (lambda i, n: on_step(label, i, n)) if on_step else None
        return generate(pipe, prompt, args, controllers, on_step=step, seeds=seeds)

    images = run_images(args.method, ([method] if method else []) + ([capture] if capture else []))
    written = save_images(images, args.out)
    plain = None
    if capture:
        captures = {args.method: (capture, images)}
        if method is not None:
            plain_capture = Capture(words, requested=named)
            plain = run_images("plain", [plain_capture])
            written += save_images(plain, args.out, "plain")
            captures = {"plain": (plain_capture, plain), **captures}
            from ..viz import comparison_figure

            written.append(args.out / "compare.png")
            comparison_figure({"plain (same seed)": plain[0], args.method: images[0]}, written[-1], prompt)
        written += write_maps(captures, words, args.out, "maps", prompt)
    elif args.maps:
        log.info("no target words to map; pass --targets")
    if args.method in layout_methods():
        written += _write_overlays(images, method.layout, args.out, "image")
        if plain is not None:
            written += _write_overlays(plain, method.layout, args.out, "plain")
    if args.seed_grid:
        written += _seed_grid(pipe, prompt, args, method, run_images)
    return written


def _seed_grid(pipe, prompt, args, method, run_images) -> list[Path]:
    """The plain pipeline and the method on the first `--seed-grid` seeds, judged where the shapes world's scorer
    can judge them (a built-in model, a prompt of "a COLOUR SHAPE" phrases): seeds.png and seeds.csv."""
    from ..eval import write_rows
    from ..shapes.scorer import judged, objects_of_prompt
    from ..viz import seed_grid_figure

    seeds = [args.seed + k for k in range(args.seed_grid)]
    rows = {"plain": run_images("plain", [], seeds=seeds),
            args.method: run_images(args.method, [_controller(args)[0]], seeds=seeds)}  # a fresh controller
    shapes_world = resolve_model(args, builtin_model(args.method)).startswith("builtin:")
    objects = objects_of_prompt(prompt) if shapes_world else None
    boxes = [r.box for r in method.layout.regions] if args.method in layout_methods() else None
    captions = {label: [judged(image, objects, boxes) if objects else "" for image in images]
                for label, images in rows.items()}
    if objects:
        good = "all placed" if boxes else "all bound"
        log.info("%s on seeds %d-%d: plain %d/%d, %s %d/%d", good, seeds[0], seeds[-1],
                 captions["plain"].count(good), len(seeds), args.method, captions[args.method].count(good), len(seeds))
    paths = [args.out / "seeds.png", args.out / "seeds.csv"]
    seed_grid_figure(rows, captions, seeds, paths[0], prompt)
    write_rows([{"seed": seed, **{label: captions[label][k] for label in rows}} for k, seed in enumerate(seeds)],
               paths[1])
    return paths


def _write_overlays(images, layout, out: Path, stem: str) -> list[Path]:
    """Each image with the layout's regions drawn over it (STEM_layout.png, or STEM_I_layout.png)."""
    from ..viz import overlay

    paths = [out / (f"{stem}_layout.png" if len(images) == 1 else f"{stem}_{i}_layout.png")
             for i in range(len(images))]
    for image, path in zip(images, paths):
        overlay(image, layout).save(path)
    return paths

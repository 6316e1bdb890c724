"""`attnctl analyze`: the layer-wise hierarchy analysis of joint attention for a layout."""

from __future__ import annotations

from pathlib import Path

from ..config import argument_type
from ..errors import UsageError
from ..methods.capture import parse_steps
from ..methods.registry import builtin_model
from .common import (
    add_method_options,
    add_model_options,
    call_kwargs,
    finite_images,
    given_method_flags,
    load,
    method_config,
    print_written,
    resolve_model,
)


def register(sub) -> None:
    p = sub.add_parser("analyze", help="layer-wise hierarchy analysis of joint attention for a layout")
    add_model_options(p, "builtin:shapes-mmdit")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layout", required=True, help="layout JSON: prompt, background and regions")
    p.add_argument("--with-ast", action="store_true", help="measure with AST attached (default: the plain model)")
    p.add_argument("--analyze-steps", type=argument_type(parse_steps), default=None,
                   help="step indices to record, e.g. 0-9 or 0,5,10 (default: every step)")
    add_method_options(p, "ast")
    p.set_defaults(func=run)


def run(args) -> None:
    """Run the pipeline once with the observer (and AST with --with-ast); write hierarchy.csv, hierarchy.png and the
    image with its layout overlay to --out."""
    import torch

    from ..analysis import Hierarchy
    from ..control import apply
    from ..layout import Layout
    from ..methods.ast import AST
    from ..viz import overlay

    layout = Layout.load(args.layout)  # a bad layout fails before the model loads
    flags = given_method_flags(args, "ast")
    config = method_config("ast", args, resolve_model(args, builtin_model("ast")))
    if not args.with_ast and set(flags) - {"--ast-role-parser"}:
        raise UsageError(f"{', '.join(flags)} change AST, which runs only with --with-ast")
    hierarchy = Hierarchy(layout, steps=args.analyze_steps, role_parser=config.role_parser)
    controllers = ([AST(layout, config)] if args.with_ast else []) + [hierarchy]
    pipe = load(args, builtin_model("ast"))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with apply(pipe, *controllers, prompt=layout.prompt):
        images = finite_images(pipe(layout.prompt, generator=generator,
                                    **{**call_kwargs(args, pipe), "output_type": "np"}).images, args)
    if not hierarchy.rows:
        raise UsageError("nothing was recorded: check --analyze-steps against --steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "hierarchy.csv", out / "hierarchy.png"]
    hierarchy.write_csv(written[0])
    label = "with AST" if args.with_ast else "plain"
    hierarchy.plot(written[1], title=f"{args.model} ({label}): {layout.prompt}")
    for i, image in enumerate(images):
        stem = "image" if len(images) == 1 else f"image_{i}"
        written += [out / f"{stem}.png", out / f"{stem}_layout.png"]
        image.save(written[-2])
        overlay(image, layout).save(written[-1])
    print(f"attnctl: hierarchy.csv has {len(hierarchy.rows)} rows")
    print_written(written, out)

"""`attnctl analyze`: the layer-wise hierarchy analysis of joint attention for a layout."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..methods.capture import parse_steps
from ..methods.registry import builtin_model
from .common import add_method_options, add_model_options, given_method_flags, load, print_written, sampling_of
from .flags import argument_type


def register(sub) -> None:
    """Adds the `attnctl analyze` parser."""
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
    from ..analysis import Hierarchy
    from ..layout import Layout
    from ..methods.ast import ASTConfig
    from ..run import Request, pipeline_call
    from ..viz import overlay
    from .flags import given_arguments

    layout = Layout.load(args.layout)  # a bad layout fails before the model loads
    flags = given_method_flags(args, "ast")
    if not args.with_ast and set(flags) - {"--ast-role-parser"}:
        raise UsageError(f"{', '.join(flags)} change AST, which runs only with --with-ast")
    request = Request(method="ast", layout=layout, options=given_arguments(ASTConfig, args), model=args.model,
                      sampling=sampling_of(args))
    ast = request.controller()
    hierarchy = Hierarchy(layout, steps=args.analyze_steps, role_parser=ast.config.role_parser)
    pipe = load(args, builtin_model("ast"))
    images = pipeline_call(pipe, layout.prompt, request.sampling, request.model_spec,
                           ([ast] if args.with_ast else []) + [hierarchy])
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

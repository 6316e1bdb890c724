"""`attnctl generate`: images with an attention-control method; with --maps also the plain pipeline's image (same
seed) beside it (compare.png) and the maps of the method's words with and without it (maps.png)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..methods.registry import METHODS, PLAIN, choices, layout_methods, listing
from ..outputs import write
from ..run import Request, generate
from .common import add_method_options, add_model_options, check_out, given_method_flags, print_written, sampling_of
from .flags import given_arguments


def register(sub) -> None:
    """Adds the `attnctl generate` parser, with every method's options."""
    from ..defaults import DEFAULT_MODEL

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


def request_of(args) -> Request:
    """The command line as a `Request` (checked before any model loads)."""
    from ..layout import Layout
    from ..methods.regulation import RegulationConfig

    _refuse_other_methods(args)
    layout = None
    if args.method in layout_methods():
        if args.auto_layout:
            if not args.prompt:
                raise UsageError("--auto-layout reads the layout from --prompt: pass --prompt \"a red circle to the "
                                 "left of a blue square\"")
            layout = Layout.from_prompt(args.prompt)
        elif args.prompt:
            raise UsageError(f"--prompt does not apply to --method {args.method} by itself: the prompt is the "
                             "layout's (--layout L.json), or pass --auto-layout to read the layout from the prompt")
        elif args.layout:
            layout = Layout.load(args.layout)
    elif args.layout or args.auto_layout:
        flag = "--layout" if args.layout else "--auto-layout"
        raise UsageError(f"{flag} applies to --method {listing(layout_methods())} only, not --method {args.method}")
    options = given_arguments(METHODS[args.method].config, args) if args.method in METHODS else {}
    targets = options.pop("targets", None) if args.method in METHODS else \
        given_arguments(RegulationConfig, args).get("targets")
    check_out(args.out)
    return Request(method=args.method, prompt=args.prompt or "", layout=layout, targets=targets, options=options,
                   model=args.model, sampling=sampling_of(args), maps=args.maps, seed_grid=args.seed_grid)


def main(args) -> None:
    """Generates what the command line asks (`request_of`) and writes it to --out."""
    request = request_of(args)
    print_written(write(generate(request), args.out), args.out)

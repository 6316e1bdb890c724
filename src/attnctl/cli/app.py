"""`attnctl app`: the sketch-to-image web page (Gradio), on this machine only unless told otherwise."""

from __future__ import annotations

from ..config import comma_list
from ..errors import UsageError
from ..methods.registry import choices
from ..sampling import SamplingConfig
from .flags import add_arguments, argument_type

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    """Adds the `attnctl app` parser."""
    p = sub.add_parser("app", help="a web page: paint a layout, generate with every method, see the maps")
    p.add_argument("--model", default=None,
                   help="the model the page starts with (default: the built-in model that fits the method)")
    p.add_argument("--method", choices=choices(), default="relocation",
                   help="the method the page starts with (default: relocation, which places the sketch's objects)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--models", type=argument_type(comma_list), default=None,
                   help="the models the page may load, comma-separated, offered as a choice instead of a text field "
                        "(default: any spec typed on the page when serving on this machine only; beyond it, the "
                        "built-in models and --model)")
    p.add_argument("--port", type=int, default=7860)
    add_arguments(p, SamplingConfig, only=("device", "dtype"))
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default: 10)")
    p.set_defaults(func=run)


def run(args) -> None:
    """Serve the page until Ctrl+C: on this machine only by default; beyond it, with the model a choice among
    --models."""
    from ..defaults import DEFAULT_JOINT_MODEL, DEFAULT_MODEL
    from ..models import check_spec
    from .common import bounded, sampling_of

    bounded("--port", args.port, 1, 65535)
    bounded("--max-upload-mb", args.max_upload_mb, 0.01, 1024)
    sampling = sampling_of(args)
    models = args.models
    if models is None and args.host not in LOOPBACK:
        models = list(dict.fromkeys([DEFAULT_MODEL, DEFAULT_JOINT_MODEL, *([args.model] if args.model else [])]))
    if models is not None and args.model and args.model not in models:
        raise UsageError(f"--model {args.model} is not among --models {','.join(models)}: add it there")
    for spec in [*(models or []), *([args.model] if args.model else [])]:
        check_spec(spec)  # a page that could never load its model must not start
    from ..app import CSS, Page  # after the cheap checks: Gradio takes a few seconds to import

    page = Page(model=args.model, method=args.method, device=sampling.device, dtype=sampling.dtype,
                models=tuple(models) if models is not None else None)
    if args.host not in LOOPBACK:
        print(f"attnctl: warning: serving on {args.host}: anyone who can reach this machine can use the page; it "
              f"loads only {', '.join(models)}")
    print(f"attnctl: the page is at http://{args.host}:{args.port} (Ctrl+C stops it)")
    try:  # the upload limit in bytes: Gradio reads "10.0mb" as 10 of ".0MB"; show_error: Gradio's own errors with
        # their text, not a bare "Error"
        page.blocks().queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=False, max_file_size=round(args.max_upload_mb * 2**20),
            css=CSS, footer_links=[], quiet=True, show_error=True)
    except OSError as err:
        raise UsageError(f"cannot serve on {args.host}:{args.port} ({err}); pick another --port") from None
    finally:
        page.close()


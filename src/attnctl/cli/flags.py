"""The command line's side of the configs: one flag per config field (`add_arguments`), the flags given read back
by field name (`given_arguments`), and parse errors as argparse's own. argparse stays in `cli/`; the library takes
configs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..config import cli_fields, default_of, default_text, flag_of, text_parser
from ..errors import UsageError


def _dest(config_class, name: str) -> str:
    # its own namespace: a field may share its name with another option of the command (Regulation's `seed`)
    return "option" + flag_of(config_class, name)


def add_arguments(parser, config_class, title: str | None = None, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of `config_class` (`--PREFIXNAME`), with the field's meaning and default as help; `only`:
    these fields' flags alone. Flags the user does not give are absent from the parsed namespace, so defaults and a
    model's recommendations stay in the config (see `given_arguments`)."""
    group = parser.add_argument_group(title) if title else parser
    for field in cli_fields(config_class):
        if only is not None and field.name not in only:
            continue
        meta, default = field.metadata, default_of(field)
        shown = meta.get("shown_default") or default_text(field)
        help_text = f"{meta['help']} (default: {shown}" + (f"; {meta['symbol']} in the paper)" if meta.get("symbol")
                                                             else ")")
        flag = flag_of(config_class, field.name)
        if flag in parser._option_string_actions:
            continue  # shared with a method added before (--targets): one flag, read by both configs
        kwargs: dict[str, Any] = dict(dest=_dest(config_class, field.name), default=argparse.SUPPRESS,
                                      help=help_text.replace("%", "%%"))
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = argument_type(text_parser(field))
            kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}" if meta.get("choices") else \
                flag[2:].upper().replace("-", "_")
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        group.add_argument(flag, **kwargs)


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse: its UsageError becomes argparse's own error, with our message kept."""

    def convert(text: str):
        try:
            return parse(text)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid int value"
    return convert


def given_arguments(config_class, args: argparse.Namespace) -> dict:
    """The fields whose flags were given on the command line, by field name."""
    return {f.name: getattr(args, _dest(config_class, f.name)) for f in cli_fields(config_class)
            if hasattr(args, _dest(config_class, f.name))}

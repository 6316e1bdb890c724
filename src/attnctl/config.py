"""Method options, defined once: each method has a documented `@dataclass` config whose fields are declared with
`option(...)`. From those fields come the method's keywords (`build`), the command-line flags (`cli.flags`:
`add_arguments`, `given_arguments`), the page's fields, and the names a model folder's `attnctl.json` uses to
recommend settings.

    @dataclass
    class MyConfig:
        strength: float = option(1.0, "how hard to push", symbol="λ")

    config = build(MyConfig, None, strength=2.0)          # MyConfig(strength=2.0); unknown names are a UsageError
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UsageError


def option(default: Any, help: str, *, symbol: str | None = None, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, choices: tuple | None = None, cli: bool = True,
           shown_default: str | None = None, low: float | None = None, high: float | None = None):
    """A config field. `help` says what it means; `symbol` is the paper's symbol; `flag` replaces the field name on
    the command line (one starting with -- is used as it is, without the config's prefix: a flag that methods share,
    such as --targets); `parse` turns the flag's text into the field's value (default: the type of `default`);
    `choices` are the allowed values; `cli=False` keeps the field off the command line; `shown_default` describes a
    default that is not a plain value (such as None meaning "chosen per model"); `low` and `high` bound a number
    (inclusive). Numbers must be finite and of the field's kind (`check`)."""
    metadata = dict(help=help, symbol=symbol, flag=flag, parse=parse, choices=choices, cli=cli,
                    shown_default=shown_default, low=low, high=high)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def build(config_class, config=None, /, **options):
    """A `config_class` instance: `config` (or the defaults) with `options` replacing fields by name."""
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UsageError(f"unknown {config_class.__name__} option(s) {', '.join(unknown)}; the options are "
                         f"{', '.join(names)}")
    if config is None:
        return config_class(**options)
    if not isinstance(config, config_class):
        raise UsageError(f"config must be a {config_class.__name__}, not {type(config).__name__}")
    return dataclasses.replace(config, **options) if options else config


def number_kind(field: dataclasses.Field):
    """The kind of number a field holds (bool, int or float, from its default or its parser), or None."""
    default, parse = default_of(field), field.metadata.get("parse")
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return type(default)
    return parse if parse in (int, float) else None


def check(config) -> None:
    """Every field of `config` against its declaration: booleans are booleans, numbers finite, of their kind (an
    integer where one is needed) and within their bounds, choices among the allowed ones. Called first by each
    config's `__post_init__`; a violation is a UsageError naming the option and its flag."""
    prefix = _prefix(config)
    for field in dataclasses.fields(config):
        value, meta, kind = getattr(config, field.name), field.metadata, number_kind(field)
        name = _named(field, prefix) if meta.get("cli", True) else field.name
        if value is None and default_of(field) is None:
            continue
        if kind is bool:
            if not isinstance(value, bool):
                raise UsageError(f"{name} must be true or false, not {value!r}")
        elif kind is not None and not (_takes_collections(field) and isinstance(value, (list, tuple, set, range))):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise UsageError(f"{name} must be a number, not {value!r}")
            integral = isinstance(value, numbers.Integral)  # exact at any size (float() overflows past 1e308)
            if not integral and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, not {value!r}")
            if kind is int and not integral and not float(value).is_integer():
                raise UsageError(f"{name} must be a whole number, not {value!r}")
            low, high = meta.get("low"), meta.get("high")
            if (low is not None and value < low) or (high is not None and value > high):
                low, high = _shown(low), _shown(high)
                bounds = (f"between {low} and {high}" if low is not None and high is not None
                          else f"at least {low}" if low is not None else f"at most {high}")
                raise UsageError(f"{name} must be {bounds}, not {value!r}")
        if meta.get("choices") and (not isinstance(value, str) or value not in meta["choices"]):
            raise UsageError(f"{name} must be one of {', '.join(meta['choices'])}, not {value!r}")


def _named(field: dataclasses.Field, prefix: str) -> str:
    """A field as messages name it: its flag, and its name too where the flag does not say it ("strength
    (--ast-strength)", but "--steps")."""
    flag = _flag(field, prefix)
    return flag if flag == "--" + field.name.replace("_", "-") else f"{field.name} ({flag})"


def _shown(bound):
    """A bound as a message shows it: whole numbers in full (2**64 - 1, not 1.84467e+19), others as %g."""
    if bound is None or isinstance(bound, int):
        return bound
    return f"{bound:g}"


def _items(value) -> list | None:
    """The items of a list-like value (not a string, bytes or a mapping), or None."""
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        return None
    try:
        return list(value)
    except TypeError:  # not iterable (a number, a 0-d array)
        return None


def comma_list(text: str) -> list[str]:
    """'cat, dog#2' -> ['cat', 'dog#2']: a comma-separated flag value, blanks dropped."""
    return [w.strip() for w in text.split(",") if w.strip()]


def word_list(words, name: str) -> list[str]:
    """`words` (a list of words of the prompt, or one comma-separated string) as a list; a UsageError naming
    `name` unless every word is a non-empty string."""
    if isinstance(words, str):
        words = comma_list(words)
    items = _items(words)
    if items is None or not all(isinstance(w, str) and w.strip() for w in items):
        raise UsageError(f"{name} must be a list of words of the prompt such as [\"cat\", \"dog\"] (or \"cat,dog\"), "
                         f"each a non-empty string, not {words!r}")
    return items


def step_indices(steps, name: str) -> list[int]:
    """`steps` (a collection of denoising step indices such as range(10) or [0, 5, 10]) as a list of ints; a
    UsageError naming `name` unless every item is a whole number >= 0."""
    items = _items(steps)
    if items is None:
        raise UsageError(f"{name} must be a collection of step indices such as range(10) or [0, 5, 10], not "
                         f"{steps!r}")
    for s in items:
        if (isinstance(s, bool) or not isinstance(s, numbers.Real) or s < 0
                or not (isinstance(s, numbers.Integral) or math.isfinite(s) and float(s).is_integer())):
            raise UsageError(f"{name}: step indices are whole numbers from 0, not {s!r}")
    return [int(s) for s in items]


def _takes_collections(field: dataclasses.Field) -> bool:
    """Whether a number field also takes a collection (its annotation names a tuple, as Regulation's edit_steps: a
    count or step indices); the config's own `__post_init__` checks the collection's items."""
    return "tuple" in str(field.type) or "list" in str(field.type)


def _prefix(config_class) -> str:
    """What a config's flags start with after `--` (its class attribute `cli_prefix`, e.g. "ast-")."""
    return getattr(config_class, "cli_prefix", "")


def _flag(field: dataclasses.Field, prefix: str) -> str:
    flag = field.metadata.get("flag") or field.name.replace("_", "-")
    return flag if flag.startswith("--") else "--" + prefix + flag


def cli_fields(config_class) -> list[dataclasses.Field]:
    """The fields of `config_class` that have command-line flags (all but those with `cli=False`), in order."""
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("cli", True)]


def default_of(field: dataclasses.Field):
    """A field's default value (a fresh one from its `default_factory` where it has one)."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def value_text(value) -> str:
    """A value written as a flag takes it ("a,b" for a list, "k:v,k:v" for a mapping; "" for None)."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple, range)):
        return ",".join(map(str, value))
    return str(value)


def default_text(field: dataclasses.Field) -> str:
    """A field's default written as its flag's value (`value_text`)."""
    return value_text(default_of(field))


def as_arguments(config_class, values: dict) -> list[str]:
    """Command-line words that set `values` (field name -> value) of `config_class`: `--flag value` (a value
    starting with "-" stays a value: `flag_words`), `--flag`/`--no-flag` for booleans; in the config's field
    order."""
    prefix, words = _prefix(config_class), []
    for field in cli_fields(config_class):
        if field.name in values:
            flag, value = _flag(field, prefix), values[field.name]
            if isinstance(default_of(field), bool):
                words.append(flag if value else "--no-" + flag[2:])
            else:
                words += flag_words(flag, value_text(value))
    return words


def flag_words(flag: str, text: str) -> list[str]:
    """`[flag, text]`, or `[flag=text]` where the text starts with "-" (argparse would read it as an option)."""
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


def text_parser(field: dataclasses.Field):
    """What turns a flag's text into the field's value: its declared `parse`, else the type of its default (text
    where the default is None)."""
    default = default_of(field)
    return field.metadata.get("parse") or (str if default is None else type(default))


def parsed_value(flag: str, field: dataclasses.Field, text: str):
    """A flag's text as its field's value, parsed as the command line parses it; a UsageError naming the flag."""
    parse = text_parser(field)
    try:
        return parse(text)
    except UsageError as err:
        raise UsageError(f"{flag}: {err}") from None
    except (ValueError, TypeError):
        raise UsageError(f"{flag}: invalid {getattr(parse, '__name__', 'value')} value: {text!r}") from None


def flag_of(config_class, name: str) -> str:
    """The command-line flag of a field (for messages)."""
    return _flag(next(f for f in dataclasses.fields(config_class) if f.name == name), _prefix(config_class))


def describe(options: dict) -> str:
    """Options as one line for messages: "k=v, k=v", with a list's items joined by commas."""
    return ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in options.items())

"""How a value from a YAML file or a `key=value` override becomes a typed config value: the
field's scalar type, an Optional's null, one of a Literal's choices, or a list of these; and
how a YAML file is read; and `option`, a dataclass field that is also a command-line flag (the
text it reads goes through `coerce` too; `dtrain.commands.flags` renders it). Each error names
the key or file and says what would be valid."""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dtrain.errors import ConfigError

# what each scalar type accepts, as the errors say it
_EXPECTED = {
    int: "an int (a whole number)",
    float: "a float (a finite number)",
    bool: "a bool (true or false)",
    str: "a string (not a list or mapping)",
}
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NONES = ("none", "null", "~")  # an Optional key's None, on the command line


def coerce(value: Any, kind: Any, key: str) -> Any:
    """A YAML or command-line value as the field's type; a Literal accepts only its choices."""
    origin = typing.get_origin(kind)
    if origin is list:
        return _coerce_list(value, typing.get_args(kind)[0], key)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(kind), key)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}={value!r} is invalid: must be one of {choices}{hint}")
        return value
    try:
        return _scalar(value, kind)
    except (TypeError, ValueError, KeyError, OverflowError):
        raise ConfigError(f"{key}={value!r} is invalid: must be {_EXPECTED[kind]}") from None


def _coerce_list(value: Any, item: Any, key: str) -> list:
    """A YAML list, or a command line's `a,b` or `[a, b]`; each item as `item`, each once."""
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]")
        value = [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r} is invalid: must be a list")
    return list(dict.fromkeys(coerce(v, item, key) for v in value))


def _coerce_union(value: Any, options: tuple, key: str) -> Any:
    """An Optional's null, else the first scalar option that takes the value, in the order the
    type names them: `bool | str` reads `true` as a bool and `/x.pth` as a string."""
    optional = type(None) in options
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONES)):
        return None
    scalars = [k for k in options if k is not type(None)]
    for option in scalars:
        try:
            return _scalar(value, option)
        except (TypeError, ValueError, KeyError, OverflowError):
            continue
    expected = [_EXPECTED[k] for k in scalars] + (["null"] if optional else [])
    raise ConfigError(f"{key}={value!r} is invalid: must be {' or '.join(expected)}")


def _scalar(value: Any, kind: type) -> Any:
    """`value` as int, float, bool or str, or an exception. A string (from the command line, or
    quoted in YAML) reads as Python reads a number, so `1e-3` is a float (YAML 1.1 leaves it a
    string), and as YAML reads a bool (`true`, `no`); an empty YAML value is the empty string."""
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)
    if isinstance(value, str):
        value = _BOOLS[value.strip().lower()] if kind is bool else kind(value.strip())
    if isinstance(value, bool) != (kind is bool):
        raise TypeError(value)
    if kind is float and isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(value)
    if not isinstance(value, kind):
        raise TypeError(value)
    return value


@dataclass(frozen=True)
class Option:
    """How a dataclass field reads as a command-line option (see `option`)."""

    help: str | None
    parse: Callable[[str], Any] | None
    flag: str | None
    positional: bool
    default_help: str | None
    show_default: bool


def option(
    default: Any = MISSING,
    help: str | None = None,
    *,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    positional: bool = False,
    default_help: str | None = None,
    show_default: bool = True,
) -> Any:
    """A dataclass field and its command-line option, rendered by `dtrain.commands.flags`: the
    default is written once, here. No default: a required option. `parse` (text -> value; from
    the field's type through `coerce` where absent: int, float, str or a Literal's choices),
    `flag` (the spelling, where it is not `--field-name`; a bool field that is on by default
    needs one, the flag turning it off), `positional`, `default_help` (the default in words,
    where its value alone says too little), `show_default=False` (no `(default: ...)` after
    the help: the help says it, or there is nothing to say)."""
    cli = Option(help, parse, flag, positional, default_help, show_default)
    return field(default=default, metadata={"option": cli})


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping; a clear error naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} cannot be read: {err}") from err
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {_yaml_problem(err)}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections")
    return values


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err)
    return " ".join(f"{problem}{where}".split())

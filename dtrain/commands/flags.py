"""Command-line arguments generated from a dataclass: every field, declared with
`dtrain.config_values.option`, becomes one argparse argument (its help and its default in words,
a Literal's choices, its parse function, its spelling, positional or not), and `flag_values`
reads them back. A value without its own parse function is read by `config_values.coerce`, as a
`key=value` override is, so a flag and a config key accept the same text."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any, Literal

from dtrain.config_values import Option, coerce


def add_flags(parser: argparse.ArgumentParser, cls: type, *, given_only: bool = False) -> None:
    """One argument per field of the dataclass `cls`, in the fields' order. `given_only`: an
    option that is not given reads None (the caller layers defaults of its own underneath;
    the help still shows the field's default)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        cli = f.metadata.get("option")
        if not isinstance(cli, Option):
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with option(...)")
        _add(parser, f, cli, hints[f.name], given_only, f"{cls.__name__}.{f.name}")


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` as parsed (`cls(**flag_values(args, cls))` where all were given)."""
    return {f.name: getattr(args, f.name) for f in fields(cls)}


def _add(
    parser: argparse.ArgumentParser,
    f: Field,
    cli: Option,
    hint: Any,
    given_only: bool,
    where: str,
) -> None:
    required = f.default is MISSING
    text = _help(cli, f.default)
    absent = {} if required else {"default": None if given_only else f.default}
    flag = cli.flag or f"--{f.name.replace('_', '-')}"
    if hint is bool:
        # a flag says what it changes: --overwrite turns overwrite on, --no-progress turns it off
        if f.default is not False and cli.flag is None:
            raise TypeError(f"{where}: a bool field not off by default needs a `flag`")
        action = "store_true" if f.default is False else "store_false"
        parser.add_argument(flag, dest=f.name, action=action, help=text, **absent)
        return
    if cli.parse is not None:
        read, choices = cli.parse, None
    else:
        read, choices = _reader(where, hint)
    if cli.positional:
        nargs = {} if required else {"nargs": "?"}
        parser.add_argument(f.name, type=read, choices=choices, help=text, **nargs, **absent)
        return
    parser.add_argument(
        flag, dest=f.name, type=read, choices=choices, help=text, required=required, **absent
    )


def _reader(where: str, hint: Any) -> tuple[Callable[[str], Any], tuple | None]:
    """How to read a value of a field typed `hint`, and its choices (a Literal's values). An
    Optional reads as its type: a flag's absence is its None, and `--out none` names a folder."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            hint = options[0]
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
    kind = type(choices[0]) if choices else hint
    if kind not in (int, float, str):
        raise TypeError(f"{where}: type {hint} needs a `parse` function in its option")

    def read(text: str) -> Any:
        return coerce(text, kind, where)  # a ConfigError is a ValueError: argparse names the flag

    read.__name__ = kind.__name__  # argparse's message: invalid int value: 'x'
    return read, choices


def _help(cli: Option, default: Any) -> str | None:
    if cli.help is None:
        return None
    text = cli.help
    if cli.show_default and default is not MISSING:
        text += f" (default: {_shown_default(cli, default)})"
    return text.replace("%", "%%")


def _shown_default(cli: Option, default: Any) -> str:
    if cli.default_help is not None:
        return cli.default_help
    if isinstance(default, bool):
        return "on" if default else "off"  # a flag that is not given
    if isinstance(default, list | tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return "none" if default is None else str(default)

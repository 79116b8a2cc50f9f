"""`dtrain prepare` on the command line. Its flags are generated from PrepareConfig's fields and
their metadata (help, flag spelling, parsing): a default is written once, in the dataclass, and
a new field is a new flag."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from typing import Any, Literal

from dtrain.prepare.pipeline import prepare
from dtrain.prepare.prepare_config import PrepareConfig

DESCRIPTION = (
    "Turn a labelled image source into {train,val,test}-%06d.tar WebDataset shards, a "
    "manifest.parquet and a dataset.json, with the clean label kept beside the noisy one."
)


def _value_type(name: str, hint: Any) -> tuple[Callable[[str], Any], tuple | None]:
    """How to read one command-line value of a field typed `hint`: the parser and the choices
    (a Literal's values), `None` aside."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            hint = options[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if hint in (int, float, str):
        return hint, None
    raise TypeError(f"PrepareConfig.{name}: type {hint} needs a `parse` function in its metadata")


def _shown_default(f: Field, default: Any) -> str:
    if "default_help" in f.metadata:
        return f.metadata["default_help"]
    if isinstance(default, bool):
        return "off"  # a flag that is not given
    if isinstance(default, list | tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return "none" if default is None else str(default)


def _add_field(parser: argparse.ArgumentParser, f: Field, hint: Any, default: Any) -> None:
    meta = f.metadata
    text = f"{meta['help']} (default: {_shown_default(f, default)})".replace("%", "%%")
    flag = meta.get("flag", f"--{f.name.replace('_', '-')}")
    if hint is bool:
        # a flag says what it changes: --overwrite turns overwrite on, --no-progress turns it off
        if default and "flag" not in meta:
            raise TypeError(f"PrepareConfig.{f.name}: a field on by default needs a `flag`")
        action = "store_false" if default else "store_true"
        parser.add_argument(flag, dest=f.name, action=action, default=default, help=text)
        return
    if "parse" in meta:
        parse, choices = meta["parse"], None
    else:
        parse, choices = _value_type(f.name, hint)
    if meta.get("positional"):
        parser.add_argument(
            f.name, nargs="?", type=parse, choices=choices, default=default, help=text
        )
        return
    parser.add_argument(flag, dest=f.name, type=parse, choices=choices, default=default, help=text)


def add_prepare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `prepare` and one flag per PrepareConfig field to the `dtrain` subcommands."""
    parser = sub.add_parser(
        "prepare",
        help="turn an image source into WebDataset shards with recorded label noise",
        description=DESCRIPTION,
    )
    hints = typing.get_type_hints(PrepareConfig)
    defaults = PrepareConfig()
    for f in fields(PrepareConfig):
        _add_field(parser, f, hints[f.name], getattr(defaults, f.name))
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """The PrepareConfig that a parsed `dtrain prepare` command line asks for."""
    return PrepareConfig(**{f.name: getattr(args, f.name) for f in fields(PrepareConfig)})


def run_prepare(args: argparse.Namespace) -> None:
    prepare(config_from_args(args))

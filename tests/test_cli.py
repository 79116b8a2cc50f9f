"""The command line's one convention: every module of `dtrain.commands` declares one command,
`main` finds them (a new command is one new file), and one generator turns a dataclass's fields
into arguments and reads them back."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from dtrain import commands
from dtrain.commands import Command
from dtrain.commands.flags import add_flags, flag_values
from dtrain.commands.main import NOT_COMMANDS, discover, main
from dtrain.config_values import option

ROOT = Path(__file__).resolve().parent.parent
# in the order a user meets them: data, train, score, review, relabel, use, search, scale
ORDER = ["prepare", "index", "train", "eval", "review", "relabel", "predict", "tune", "launch"]


def command_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__)]
    return [f"dtrain.commands.{n}" for n in names if n not in NOT_COMMANDS]


def test_every_command_module_declares_one_command_and_help_lists_them_in_order(capsys):
    for name in command_modules():
        module = importlib.import_module(name)
        declared = [v for v in vars(module).values() if isinstance(v, Command)]
        assert declared == [module.COMMAND], name
    assert [c.name for c in discover(commands)] == ORDER
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "{" + ",".join(ORDER) + "}" in capsys.readouterr().out


def test_command_modules_import_nothing_heavy():
    """Every parser is built for every command line: a module that imported torch at its top
    would slow `dtrain --help` and every refusal."""
    heavy = ["torch", "ray", "sklearn", "scipy", "pandas", "timm"]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in command_modules())
        + f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


PLANTED = """
from dtrain.commands import Command


def add_arguments(parser):
    parser.add_argument("--to", required=True)


def run(args):
    open(args.to, "w").write("hello")


COMMAND = Command(
    name="hello", order=35, help="say hello", description="", add_arguments=add_arguments, run=run
)
"""


def test_a_planted_command_module_is_found_listed_and_run(tmp_path, monkeypatch, capsys):
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "hello.py").write_text(PLANTED)
    monkeypatch.setattr(commands, "__path__", [*commands.__path__, str(planted)])
    monkeypatch.delitem(sys.modules, "dtrain.commands.hello", raising=False)
    try:
        assert [c.name for c in discover(commands)] == [*ORDER[:3], "hello", *ORDER[3:]]
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "    hello               say hello" in capsys.readouterr().out
        main(["hello", "--to", str(tmp_path / "said")])
        assert (tmp_path / "said").read_text() == "hello"
        (planted / "broken.py").write_text("VALUE = 1\n")
        with pytest.raises(TypeError, match="dtrain.commands.broken declares no COMMAND"):
            discover(commands)
    finally:
        for name in ("dtrain.commands.hello", "dtrain.commands.broken"):
            sys.modules.pop(name, None)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


@dataclass(kw_only=True)
class Made:
    """A made-up options dataclass: one field of each kind the generator knows."""

    where: str = option(help="a required positional", positional=True)
    kind: Literal["cat", "dog"] = option("cat", "a Literal: its values are the choices")
    ids: list[int] | None = option(None, "a list", parse=ints, default_help="all of them")
    rate: float = option(0.5, "a float, read as a key=value override is")
    tag: str | None = option(None, "an optional string", show_default=False)
    color: bool = option(True, "colour off", flag="--no-color", default_help="on")
    quiet: bool = option(False, "a bool off by default")


def made_parser(given_only: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="made")
    add_flags(parser, Made, given_only=given_only)
    return parser


def made(*argv: str) -> Made:
    return Made(**flag_values(made_parser().parse_args(argv), Made))


def test_a_dataclass_becomes_arguments_and_parses_back():
    assert made("here") == Made(where="here")
    argv = ["--kind", "dog", "--ids", "3,1,3", "--rate", " 2", "--tag", "none", "--no-color"]
    assert made("here", *argv, "--quiet") == Made(
        where="here", kind="dog", ids=[3, 1, 3], rate=2.0, tag="none", color=False, quiet=True
    )
    assert isinstance(made("x", "--rate", "2").rate, float)
    for bad in (["x", "--kind", "cow"], ["x", "--rate", "nan"], ["x", "--rate", "1,2"], []):
        with pytest.raises(SystemExit):
            made_parser().parse_args(bad)
    given = vars(made_parser(given_only=True).parse_args(["here", "--rate", "1"]))
    assert given == {
        "where": "here", "kind": None, "ids": None, "rate": 1.0, "tag": None, "color": None,
        "quiet": None,
    }  # fmt: skip


def test_the_help_shows_each_default_once(capsys):
    text = " ".join(made_parser().format_help().split())
    assert "usage: made [-h] [--kind {cat,dog}] [--ids IDS] [--rate RATE] [--tag TAG]" in text
    for shown in (
        "where a required positional",
        "a Literal: its values are the choices (default: cat)",
        "a list (default: all of them)",
        "(default: 0.5)",
        "--tag TAG an optional string --no-color colour off (default: on)",
        "a bool off by default (default: off)",
    ):
        assert shown in text


def test_a_field_the_generator_cannot_render_is_refused():
    @dataclass
    class OnWithoutFlag:
        color: bool = option(True, "colour")

    @dataclass
    class Undeclared:
        size: int = 1

    @dataclass
    class NoParse:
        sizes: list[int] = option((1,), "sizes")

    for cls, message in (
        (OnWithoutFlag, "OnWithoutFlag.color: a bool field not off by default needs a `flag`"),
        (Undeclared, "Undeclared.size: declare it with option"),
        (NoParse, "NoParse.sizes: type list.int. needs a `parse` function"),
    ):
        with pytest.raises(TypeError, match=message):
            add_flags(argparse.ArgumentParser(), cls)

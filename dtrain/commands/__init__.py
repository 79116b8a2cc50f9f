"""The `dtrain` command line: `main` (the parser; errors to one line), `flags` (arguments from a
dataclass) and one module per command, each declaring it as `COMMAND = Command(...)`; `main`
finds them, so a new command is a new module here."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One `dtrain` subcommand. Its module imports nothing heavy (torch, Ray, ...): `run` does,
    after the arguments are checked, so that `dtrain --help` and a refusal are fast."""

    name: str
    order: int  # its place in `dtrain --help`: in the order a user meets the commands
    help: str  # its line in `dtrain --help`
    description: str  # the head of `dtrain NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    raw_description: bool = False  # keep the description's line breaks
    stop_handlers: bool = False  # keep the stop-signal handlers (training checkpoints on them)

    def add_to(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add this command and its arguments to `sub`, a parser's subcommands."""
        parser = sub.add_parser(
            self.name,
            help=self.help,
            description=self.description,
            formatter_class=(
                argparse.RawDescriptionHelpFormatter
                if self.raw_description
                else argparse.HelpFormatter
            ),
        )
        self.add_arguments(parser)
        return parser

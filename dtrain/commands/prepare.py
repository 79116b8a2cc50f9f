"""`dtrain prepare` on the command line: one flag per PrepareConfig field (dtrain.commands.flags),
so a default is written once, in the dataclass, and a new field is a new flag."""

from __future__ import annotations

import argparse

from dtrain.commands import Command
from dtrain.commands.flags import add_flags, flag_values
from dtrain.prepare.prepare_config import PrepareConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, PrepareConfig)


def run(args: argparse.Namespace) -> None:
    from dtrain.prepare.pipeline import prepare

    prepare(PrepareConfig(**flag_values(args, PrepareConfig)))


COMMAND = Command(
    name="prepare",
    order=10,
    help="turn an image source into WebDataset shards with recorded label noise",
    description="Turn a labelled image source into {train,val,test}-%06d.tar WebDataset shards, "
    "a manifest.parquet and a dataset.json, with the clean label kept beside the noisy one.",
    add_arguments=add_arguments,
    run=run,
)

"""`dtrain index` on the command line: one flag per IndexOptions field (dtrain.commands.flags).
Kept apart from `scan.py`, which imports torch, so that `dtrain --help` and the other commands
start fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dtrain.commands import Command
from dtrain.commands.flags import add_flags, flag_values
from dtrain.config_values import option
from dtrain.prepare.prepare_config import comma_list
from dtrain.prepare.split import SPLITS

SHARDS = "shards: a path or URL webdataset opens (pipe:..., http(s)://...), a brace pattern"


@dataclass(kw_only=True)
class IndexOptions:
    """What `dtrain index` is asked to do: the shards of each split and how to read them."""

    train: str = option(
        help=f"train {SHARDS}, e.g. 'shards/train-{{000000..000099}}.tar'", positional=True
    )
    val: str | None = option(None, f"val {SHARDS}", show_default=False)
    test: str | None = option(None, f"test {SHARDS}", show_default=False)
    label_key: str = option(
        "cls",
        "where each sample's label is: a member (cls) or a JSON member's field (json:label); an "
        "integer index or a class name",
    )
    classes: list[str] | None = option(
        None,
        "class names in index order, comma-separated",
        parse=comma_list(str),
        default_help="the sorted names found, or 0,1,... for integer labels",
    )
    out: str = option(help="the dataset folder to write")
    overwrite: bool = option(False, "replace another dataset at --out", show_default=False)
    jobs: int = option(8, "shards read at once (threads, or Ray workers with --engine ray)")
    engine: Literal["thread", "ray"] = option(
        "thread",
        "who reads the shards: threads of this process, or Ray (a private local Ray, or the "
        "cluster at --address; every node must reach the shards)",
    )
    address: str = option("", "with --engine ray, a Ray cluster to join ('auto': this node's)")
    progress: bool = option(True, "hide the progress bar", flag="--no-progress", show_default=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, IndexOptions)


def run(args: argparse.Namespace) -> None:
    from dtrain.index.scan import index_shards

    o = IndexOptions(**flag_values(args, IndexOptions))
    index_shards(
        {split: getattr(o, split) for split in SPLITS if getattr(o, split)},
        Path(o.out),
        label_key=o.label_key,
        classes=o.classes,
        overwrite=o.overwrite,
        progress=o.progress,
        jobs=o.jobs,
        engine=o.engine,
        address=o.address,
    )


COMMAND = Command(
    name="index",
    order=20,
    help="make a dataset folder for WebDataset shards of your own, without copying them",
    description="Make a dataset folder (dataset.json, manifest.parquet) for WebDataset shards "
    "that your own pipeline wrote, without copying them: every shard is read once for its exact "
    "sample count, its sha256 (checked again as training streams it) and its labels; "
    "dataset.json records where each shard is.",
    add_arguments=add_arguments,
    run=run,
)

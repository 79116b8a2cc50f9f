"""`dtrain index` on the command line (kept apart from `scan.py`, which imports torch, so that
`dtrain --help` and the other commands start fast)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtrain.prepare.prepare_config import comma_list
from dtrain.prepare.split import SPLITS

DESCRIPTION = (
    "Make a dataset folder (dataset.json, manifest.parquet) for WebDataset shards that your own "
    "pipeline wrote, without copying them: every shard is read once for its exact sample count, "
    "its sha256 (checked again as training streams it) and its labels; dataset.json records "
    "where each shard is."
)


def add_index_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `index` to the `dtrain` subcommands."""
    p = sub.add_parser(
        "index",
        help="make a dataset folder for WebDataset shards of your own, without copying them",
        description=DESCRIPTION,
    )
    shards = "shards: a path or URL webdataset opens (pipe:..., http(s)://...), a brace pattern"
    p.add_argument("train", help=f"train {shards}, e.g. 'shards/train-{{000000..000099}}.tar'")
    p.add_argument("--val", help=f"val {shards}")
    p.add_argument("--test", help=f"test {shards}")
    p.add_argument(
        "--label-key",
        default="cls",
        help="where each sample's label is: a member (cls) or a JSON member's field "
        "(json:label); an integer index or a class name (default: cls)",
    )
    p.add_argument(
        "--classes",
        type=comma_list(str),
        help="class names in index order, comma-separated (default: the sorted names found, "
        "or 0,1,... for integer labels)",
    )
    p.add_argument("--out", required=True, help="the dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace another dataset at --out")
    p.add_argument("--jobs", type=int, default=8, help="shards read at once (default: 8)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    return p


def run_index(args: argparse.Namespace) -> None:
    from dtrain.index.scan import index_shards

    patterns = {s: getattr(args, s) for s in SPLITS if getattr(args, s)}
    index_shards(
        patterns,
        Path(args.out),
        label_key=args.label_key,
        classes=args.classes,
        overwrite=args.overwrite,
        progress=args.progress,
        jobs=args.jobs,
    )

"""`dtrain prepare` on the command line: its flags and the PrepareConfig they make."""

from __future__ import annotations

import argparse

from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.noise import NOISE_MODELS


def _size(text: str) -> int:
    """`500MB`, `2GB`, `1048576` -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn an image source into WebDataset shards with recorded label noise",
        description="Turn a labelled image source into {train,val,test}-%%06d.tar shards, a "
        "manifest.parquet and a dataset.json. SOURCE: nothing (the embedded Br35H brain-MRI "
        "set), an image folder root/<class>/*, a .csv/.parquet manifest with path,label "
        "columns, or a MedMNIST-format .npz.",
    )
    p.add_argument("source", nargs="?", default=None)
    p.add_argument("--out", help="output folder (default data/<name>_<noise><rate>_seed<seed>)")
    p.add_argument("--classes", type=_csv(str), help="class names in index order, comma-separated")
    p.add_argument(
        "--noise",
        choices=NOISE_MODELS,
        help="label noise on train (default: symmetric for the embedded set, none "
        "for your own data)",
    )
    p.add_argument("--noise-rate", type=float, help="fraction of wrong labels (default 0.4)")
    p.add_argument(
        "--noise-map", type=_csv(int), help="asymmetric class map, e.g. 1,2,0 (default: next class)"
    )
    p.add_argument(
        "--clean-val",
        action="store_true",
        help="keep val labels clean (default: noisy like train, as a real user's are)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        type=_csv(float),
        default=[0.7, 0.1, 0.2],
        help="train,val,test fractions (default 0.7,0.1,0.2)",
    )
    p.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.95,
        help="thumbnail correlation above which images share a group (default 0.95)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=_size, help="bytes per shard, e.g. 500MB")
    p.add_argument("--resize", type=int, help="resize the shorter side to this many pixels")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave unreadable images out instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    p.add_argument("--no-progress", action="store_true")


def run_prepare(args: argparse.Namespace) -> None:

    prepare(
        PrepareConfig(
            source=args.source,
            out=args.out,
            classes=args.classes,
            noise=args.noise,
            noise_rate=args.noise_rate,
            noise_map=args.noise_map,
            noise_val=not args.clean_val,
            seed=args.seed,
            split=tuple(args.split),
            dedup_threshold=args.dedup_threshold,
            shard_size=args.shard_size,
            shard_bytes=args.shard_bytes,
            resize=args.resize,
            skip_bad_images=args.skip_bad_images,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )

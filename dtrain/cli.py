"""The `dtrain` command line."""

from __future__ import annotations

import argparse
import sys

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


def _add_prepare(sub: argparse._SubParsersAction) -> None:
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


def _run_prepare(args: argparse.Namespace) -> None:
    from dtrain.prepare import PrepareConfig, prepare

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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier on noisy labels",
        description="Train with the config (defaults < --config YAML < key=value overrides). "
        "With no arguments: prepare the embedded Br35H set if missing and train the method.",
    )
    p.add_argument("--config", help="YAML config, e.g. configs/iam.yaml")
    p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. method.group_size=4 optim.lr=0.1"
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])


def _run_train(args: argparse.Namespace) -> None:
    import signal

    from dtrain.config import load_config
    from dtrain.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    config.validate()
    trainer = Trainer(config, resume=args.resume)
    # SLURM sends SIGTERM (or the --signal of your choice) before preemption or the time limit:
    # checkpoint at the next step and exit; `--resume` continues.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: trainer.request_stop())
    trainer.fit()


def _run_eval(args: argparse.Namespace) -> None:
    from dtrain.train.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.split, args.checkpoint)


def main(argv: list[str] | None = None) -> None:
    from dtrain.distributed import DistributedError
    from dtrain.errors import DataError

    parser = argparse.ArgumentParser(prog="dtrain", description=__doc__)
    # the deepspeed launcher passes --local_rank=N first; LOCAL_RANK in the environment says
    # the same, so it is accepted and not needed
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_eval(sub)
    args = parser.parse_args(argv)
    commands = {"prepare": _run_prepare, "train": _run_train, "eval": _run_eval}
    try:
        commands[args.command](args)
    except (
        DataError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        DistributedError,
        FloatingPointError,
    ) as err:
        print(f"dtrain {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

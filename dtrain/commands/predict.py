"""`dtrain predict RUN SOURCE --out preds.parquet`: a trained run's class probabilities for
every image of a folder, a manifest or a prepared dataset."""

from __future__ import annotations

import argparse

from dtrain.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run folder (train.run_dir)")
    p.add_argument(
        "source",
        help="an image folder (root/<class>/* gives labels; a flat folder of images none), a "
        ".csv/.parquet manifest with a path and optionally a label column, or a dataset folder "
        "(dtrain prepare, index or relabel)",
    )
    p.add_argument("--out", required=True, help="the Parquet file to write, e.g. preds.parquet")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="(default: best)")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per batch (64)")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave unreadable images out with a warning instead of stopping",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def run(args: argparse.Namespace) -> None:
    from dtrain.runs.inference import predict_source

    predict_source(
        args.run_dir,
        args.source,
        args.out,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        skip_bad_images=args.skip_bad_images,
    )


COMMAND = Command(
    name="predict",
    order=70,
    help="class probabilities of a trained run for new images",
    description="One row per image in a Parquet file: path (and key for a dataset), "
    "prob_<class>, predicted; for labelled images also label and suspicion = "
    "1 - p(label). Preprocessing is dtrain eval's, so the probabilities are eval's.",
    add_arguments=add_arguments,
    run=run,
)

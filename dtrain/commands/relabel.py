"""`dtrain relabel DATASET REVIEW.csv --out NEW`: a filled review applied to a dataset as a new
version of it (the work: `dtrain.runs.reviewed_dataset`)."""

from __future__ import annotations

import argparse

from dtrain.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="the dataset folder the review was made for")
    p.add_argument("review", help="the filled review.csv")
    p.add_argument("--out", required=True, help="the new dataset folder")
    p.add_argument("--overwrite", action="store_true", help="replace another dataset at --out")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (none either where stderr is no terminal)",
    )


def run(args: argparse.Namespace) -> None:
    from dtrain.runs.reviewed_dataset import relabel

    relabel(args.dataset, args.review, args.out, args.overwrite, args.progress)


COMMAND = Command(
    name="relabel",
    order=60,
    help="a filled review.csv -> a new dataset version with the corrected labels",
    description="Apply the corrected_label column of a review.csv (`dtrain review`) to a "
    "dataset: a class name (or index) relabels the sample, `drop` removes it, empty keeps "
    "it. Writes a new dataset folder; the original is left as it is.",
    add_arguments=add_arguments,
    run=run,
)

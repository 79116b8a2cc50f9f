"""`dtrain review RUN`: a finished run's most suspicious training labels as a page and a CSV to
correct (the work: `dtrain.runs.review_work`)."""

from __future__ import annotations

import argparse

from dtrain.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dtrain.runs.review_work import DEFAULT_FRACTION, DEFAULT_LIMIT

    p.add_argument("run_dir", help="a finished run folder (holds label_scores.parquet)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--top", type=int, metavar="N", help="review the N most suspicious labels")
    size.add_argument(
        "--fraction",
        type=float,
        metavar="F",
        help=f"review this fraction of the train set (default: {DEFAULT_FRACTION:g}, "
        f"at most {DEFAULT_LIMIT} images)",
    )
    p.add_argument("--out", help="review folder (default: RUN/review)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a review whose CSV is already filled"
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (none either where stderr is no terminal)",
    )


def run(args: argparse.Namespace) -> None:
    from dtrain.runs.review_work import write_review

    write_review(
        args.run_dir,
        args.out,
        top=args.top,
        fraction=args.fraction,
        overwrite=args.overwrite,
        progress=args.progress,
    )


COMMAND = Command(
    name="review",
    order=50,
    help="a finished run's most suspicious labels as a page and a CSV to correct",
    description="Write RUN/review/index.html (most suspicious first: each image with its "
    "given and predicted class, rank and loss; keep, relabel or drop it with one key or "
    "click, then export the filled review.csv) and review.csv, whose corrected_label "
    "column `dtrain relabel` applies.",
    add_arguments=add_arguments,
    run=run,
)

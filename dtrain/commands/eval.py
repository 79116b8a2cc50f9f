"""`dtrain eval RUN`: a finished run scored on a split of its dataset or of another one."""

from __future__ import annotations

import argparse

from dtrain.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run folder (train.run_dir)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="(test)")
    p.add_argument(
        "--checkpoint",
        default="best",
        choices=["best", "last"],
        help="best.pt (model selection) or last.pt (default: best)",
    )
    p.add_argument(
        "--data",
        help="a dataset folder (dtrain prepare, index or relabel) with the run's classes "
        "(default: the run's own dataset); its images are decoded to the run's channels",
    )
    p.add_argument("--out", help="output folder (default: RUN_DIR/eval/<dataset folder>-<split>)")


def run(args: argparse.Namespace) -> None:
    from dtrain.runs.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.split, args.checkpoint, args.data, args.out)


COMMAND = Command(
    name="eval",
    order=40,
    help="score a finished run on a split of its dataset or of another prepared one",
    description="Metrics printed as JSON; metrics.json, confusion_matrix.csv/.png and "
    "predictions.parquet (per image: probabilities, predicted class, suspicion of its label) "
    "written to --out.",
    add_arguments=add_arguments,
    run=run,
)

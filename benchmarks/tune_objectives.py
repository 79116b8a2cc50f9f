"""Which label-free objective ranks a search's trials like the clean labels do: for each
candidate (an epoch metric a user has without clean labels, averaged over its last W epochs,
minimised for losses and ECE), the Spearman rank correlation, over the trials of a full search
(`dtrain tune tuning/iam_search.yaml --scheduler none`, embedded Br35H, 40% symmetric noise),
between the objective and the clean test accuracy of the model each trial hands over
(`train.select`'s pick).

    python benchmarks/tune_objectives.py --epochs 12 --image-size 32

Two searches, so that the choice cannot flatter itself: the *tuning* search (sampler seed 0,
train.seed 0) chooses the best candidate; the *report* search (sampler seed 1, train.seed 1:
other configs, other initialisations and augmentations) reports every candidate's correlation,
the chosen one's included (`--roles tuning` runs the first alone; the result file keeps each
search's table as it comes). A finished search is reused, an interrupted one continued.
Prints a table and writes benchmarks/results/tune_objectives.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from common import REPO, RESULTS, Column, Table, write_result
from tune_asha import search

# epoch-record keys a user has: the noisy val labels (raw weights and their average) and the
# training figures; never a val_clean_* or test_* key
METRICS = [
    *(
        f"{prefix}_{name}"
        for prefix in ("val", "val_ema")
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
    ),
    "train_loss",
    "train_accuracy",
]
WINDOWS = (1, 3, 5)
TARGET = "test_clean_accuracy_best"  # what the user is handed (train.select's weights)


def minimised(metric: str) -> bool:
    """`dtrain tune --mode auto`'s rule."""
    return metric.endswith(("loss", "ece"))


def objectives(epochs: pd.DataFrame, metric: str, window: int) -> pd.Series:
    """Per trial: the metric over its last `window` epochs, signed so that higher is better."""
    mean = (
        epochs.sort_values("epoch")
        .groupby("trial_id")[metric]
        .apply(lambda v: v.dropna().tail(window).mean())
    )
    return -mean if minimised(metric) else mean


def correlations(result: dict) -> dict[str, float]:
    """Spearman(candidate, clean test accuracy of the handed-over model) per candidate."""
    trials = result["trials"]
    done = trials[trials["status"] == "done"].set_index("trial_id")[TARGET]
    out = {}
    for metric in METRICS:
        if metric not in result["epochs"].columns:
            continue
        for window in WINDOWS:
            objective = objectives(result["epochs"], metric, window).reindex(done.index)
            out[f"{metric}@{window}"] = float(objective.corr(done, method="spearman"))
    return out


def main() -> None:
    args = parse_args()
    for role in args.roles:
        seed = ROLES[role]
        settings = SimpleNamespace(**vars(args), overrides=[f"train.seed={seed}"])
        found = correlations(search(f"full_seed{seed}", "none", settings, f"--seed={seed}"))
        report(role, found, args.out)


ROLES = {"tuning": 0, "report": 1}  # role: the sampler seed and train.seed of its search
TODAY = "val_accuracy@3"  # dtrain tune's default objective before this benchmark


def report(role: str, found: dict[str, float], out: str) -> None:
    """Print one search's table and add it to the result file (the report search's table
    reuses the candidate the tuning search chose; a report search alone chooses nothing)."""
    path = Path(out)
    result = json.loads(path.read_text()) if path.is_file() else {}
    result[f"{role}_search"] = {"sampler_seed": ROLES[role], "train_seed": ROLES[role]}
    result[f"{role}_search"]["spearman"] = found
    if role == "tuning":
        result["chosen"] = max(found, key=lambda k: -math.inf if math.isnan(found[k]) else found[k])
    chosen = result.get("chosen")
    table = Table(
        Column("objective (metric@window)", 34, left=True),
        Column(f"Spearman, {role} search", 24, ".3f"),
    )
    table.header()
    for name in sorted(found, key=lambda k: -found[k] if not math.isnan(found[k]) else math.inf):
        marks = ("  <- chosen" if name == chosen else "") + ("  (today)" if name == TODAY else "")
        table.row(name + marks, found[name])
    result |= {"target": TARGET, "default_before": TODAY}
    write_result(
        "tune_objectives",
        {k: v for k, v in result.items() if k not in ("command", "date", "machine")},
        out,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--roles", nargs="+", choices=list(ROLES), default=list(ROLES))
    parser.add_argument("--storage", default=str(REPO / "runs" / "tune_objectives"))
    parser.add_argument("--out", default=str(RESULTS / "tune_objectives.json"))
    return parser.parse_args()


if __name__ == "__main__":
    main()

"""ASHA against running every config to the end, on the embedded Br35H set (40% symmetric
noise): the same 12 sampled configs of tuning/iam_search.yaml (same sampler seed), searched
twice with `dtrain tune`, once with `--scheduler none` and once with ASHA.

    python benchmarks/tune_asha.py --epochs 12 --image-size 32

Reports, for each search: the best objective (noisy val accuracy, mean of the last 3 epochs),
the clean test accuracy of the config it picks, and the trial-epochs it used; across the 12 full
runs, the Spearman rank correlation between the objective and clean val accuracy (and clean test
accuracy). Target: ASHA's pick within 1 point of the full search's pick with at most 50% of its
epochs. A search that was interrupted is continued (`--resume`), a finished one is not repeated.
Prints a table and writes benchmarks/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from common import REPO, RESULTS, Column, Table, preset, write_result

SEARCH_FILE = REPO / "tuning" / "iam_search.yaml"
SPACE = ["method.group_size", "method.temperature", "method.mixup_alpha"]


def search(name: str, scheduler: str, args: argparse.Namespace, *flags: str) -> dict:
    """Run (or continue, or reuse) one search; its trials table and summary."""
    folder = Path(args.storage) / name
    if not (folder / "summary.json").is_file():
        command = [
            sys.executable,
            "-m",
            "dtrain",
            "tune",
            str(SEARCH_FILE),
            f"train.epochs={args.epochs}",
            f"data.image_size={args.image_size}",
            *args.overrides,
            "--config",
            str(preset("iam")),
            f"--scheduler={scheduler}",
            f"--num-samples={args.samples}",
            f"--storage-path={args.storage}",
            f"--name={name}",
            f"--max-concurrent={args.max_concurrent}",
            *flags,
        ]
        resumed = (folder / "search.yaml").is_file()
        if resumed:
            command.append("--resume")
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        if not resumed:  # the wall time of a search run in one go, else none
            (folder / "wall_seconds").write_text(f"{time.perf_counter() - started:.1f}\n")
    trials = pd.read_parquet(folder / "trials.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    summary = json.loads((folder / "summary.json").read_text())
    wall = folder / "wall_seconds"
    return {
        "trials": trials,
        "epochs": epochs,
        "summary": summary,
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
    }


def config_key(row: pd.Series) -> tuple:
    return tuple(round(float(row[k]), 6) for k in SPACE)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--storage", default=str(REPO / "runs" / "tune_bench"))
    parser.add_argument(
        "--reduction-factor", type=float, help="ASHA's (default: the search file's)"
    )
    parser.add_argument("--out", default=str(RESULTS / "tune.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value for every trial")
    args = parser.parse_args()

    full = search("full", "none", args)
    if args.reduction_factor:  # another ASHA search beside the first, over the same configs
        rf = f"--reduction-factor={args.reduction_factor}"
        asha = search(f"asha_rf{args.reduction_factor:g}", "asha", args, rf)
    else:
        asha = search("asha", "asha", args)
    full_trials, asha_trials = full["trials"], asha["trials"]
    same = sorted(map(config_key, full_trials.to_dict("records"))) == sorted(
        map(config_key, asha_trials.to_dict("records"))
    )
    if not same:
        raise SystemExit("the two searches sampled different configs; compare nothing")

    # the objective's own window of clean val accuracy, per full trial
    window = 3
    clean_window = (
        full["epochs"]
        .sort_values("epoch")
        .groupby("trial_id")["val_clean_accuracy"]
        .apply(lambda v: v.tail(window).mean())
    )
    ranked = full_trials.set_index("trial_id").join(clean_window.rename("val_clean_window"))
    spearman_val = ranked["objective"].corr(ranked["val_clean_window"], method="spearman")
    spearman_test = ranked["objective"].corr(ranked["test_clean_accuracy_last"], method="spearman")

    rows = {}
    table = Table(
        Column("search", 8, left=True),
        Column("best objective", 15, ".4f"),
        Column("clean test acc of its pick", 27, ".4f"),
        Column("trial-epochs", 13, "d"),
        Column("stopped early", 14, "d"),
        Column("wall s", 8, ".0f"),
    )
    table.header()
    for name, result in (("full", full), ("asha", asha)):
        best = result["summary"]["best"]
        rows[name] = {
            "best_trial": best["trial_id"],
            "best_config": {k: best[k] for k in SPACE},
            "best_objective": best["objective"],
            "pick_clean_test_accuracy": best["test_clean_accuracy_last"],
            "trial_epochs": result["summary"]["trial_epochs"],
            "stopped_early": result["summary"]["stopped_early"],
            "wall_seconds": result["wall_seconds"],
        }
        r = rows[name]
        table.row(
            name,
            r["best_objective"],
            r["pick_clean_test_accuracy"],
            r["trial_epochs"],
            r["stopped_early"],
            r["wall_seconds"],
        )
    oracle = float(full_trials["test_clean_accuracy_last"].max())
    gap = rows["full"]["pick_clean_test_accuracy"] - rows["asha"]["pick_clean_test_accuracy"]
    epoch_share = rows["asha"]["trial_epochs"] / rows["full"]["trial_epochs"]
    print(
        f"best clean test accuracy among the {len(full_trials)} full runs (oracle): {oracle:.4f}\n"
        f"full pick - ASHA pick, clean test accuracy: {100 * gap:+.1f} points (target <= 1)\n"
        f"ASHA used {100 * epoch_share:.0f}% of the full runs' trial-epochs (target <= 50%)\n"
        f"Spearman(objective, clean val accuracy over the same {window} epochs) = "
        f"{spearman_val:.3f}; Spearman(objective, clean test accuracy) = {spearman_test:.3f}"
    )
    write_result(
        "tune",
        {
            "epochs": args.epochs,
            "image_size": args.image_size,
            "samples": args.samples,
            "max_concurrent": args.max_concurrent,
            "reduction_factor": args.reduction_factor or "the search file's",
            "search_file": str(SEARCH_FILE.relative_to(REPO)),
            "searches": rows,
            "oracle_clean_test_accuracy": oracle,
            "gap_points": 100 * gap,
            "asha_epoch_share": epoch_share,
            "spearman_objective_vs_clean_val": spearman_val,
            "spearman_objective_vs_clean_test": spearman_test,
            "targets_met": {"within_1_point": gap <= 0.01, "half_the_epochs": epoch_share <= 0.5},
            "full_trials": json.loads(full_trials.to_json(orient="records")),
            "asha_trials": json.loads(asha_trials.to_json(orient="records")),
        },
        args.out,
    )


if __name__ == "__main__":
    main()

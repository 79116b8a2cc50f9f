"""The main job's candidates (`dtrain train` on the embedded set: 40 % symmetric noise, 32 px,
resnet10t, 40 epochs) by a protocol that cannot flatter itself.

Every candidate trains on the tuning seeds (0, 1); the default is the candidate with the best
mean clean val accuracy of the handed-over model there. The chosen one, the method and the
clean-label ceiling then train on the report seeds (2, 3), where only their clean test accuracy
is read. The seed changes the initialisation and the batch order; the split and the noise are
the embedded set's.

    python benchmarks/main_job.py [--candidates iam iam_elr ...] [--runs runs/main_job]
                                  [--no-train] [--out FILE] [--report-only]

--report-only trains only the report seeds of the given candidates, the choice made before: to
re-measure the default and the ceiling on a set that a later `dtrain prepare` split otherwise.

Resumable: a run folder that holds a summary.json is read, not trained again; with --no-train a
missing one is an error that names it (the table from the runs there are). Each run this
script starts is timed (wall clock, in `<run>/wall.json`); keep the machine otherwise idle for
the times to mean something. Writes benchmarks/results/main_job.json."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, Column, Table, preset, write_result

TUNING_SEEDS = (0, 1)
REPORT_SEEDS = (2, 3)
# name: (what it is, its preset, overrides)
CANDIDATES: dict[str, tuple[str, str, list[str]]] = {
    "iam": ("the method (method.md)", "iam", []),
    "iam_elr_constant": (
        "the method + ELR's term at the paper's constant weight",
        "iam_elr",
        ["method.elr_rampup_epochs=0"],
    ),
    "iam_elr_ramp20": (
        "the method + ELR's term, its weight ramped over 20 epochs",
        "iam_elr",
        ["method.elr_rampup_epochs=20"],
    ),
    "iam_elr": ("the method + ELR's term, ramped over 30 epochs (iam_elr)", "iam_elr", []),
    "iam_elr_no_mixup": (
        "ablation: iam_elr without the attention mixup",
        "iam_elr",
        ["method.lambda_iam=0"],
    ),
    "iam_elr_no_con": (
        "ablation: iam_elr without the contrastive term",
        "iam_elr",
        ["method.lambda_con=0"],
    ),
    "con_elr_no_elr": (
        "ablation: the default (con_elr) without ELR's term",
        "con_elr",
        ["method.elr_lambda=0"],
    ),
    "con_elr_no_con": (
        "ablation: the default (con_elr) without the contrastive term",
        "con_elr",
        ["method.lambda_con=0"],
    ),
    "con_elr_rounds": (
        "the default + one clean-up round (relabel the suspects it disagrees with, train again)",
        "con_elr",
        ["train.refine_rounds=1"],
    ),
    "con_elr_crossfit": (
        "the default + one cross-fitted clean-up round (two fold models, each judging the labels "
        "it hid; train again)",
        "con_elr",
        ["train.refine_rounds=1", "train.refine_folds=2"],
    ),
    "con_elr_80": (
        "the default over 80 epochs, ELR's weight ramped over 60",
        "con_elr",
        ["train.epochs=80", "method.elr_rampup_epochs=60"],
    ),
    "con_elr_consistency": (
        "the default + FixMatch's consistency between the views (confidence 0.95, weight 1, "
        "ramped over 30 epochs)",
        "con_elr",
        ["method.consistency_lambda=1"],
    ),
    "con_elr_con2": (
        "the default with the contrastive term's weight doubled",
        "con_elr",
        ["method.lambda_con=2"],
    ),
    "con_elr_lr01": (
        "the default with the learning rate doubled (0.1)",
        "con_elr",
        ["optim.lr=0.1"],
    ),
    "ceiling": ("the method on the clean training labels", "iam", ["data.train_labels=clean"]),
}
ALWAYS_REPORTED = ("iam", "ceiling")
DTRAIN = Path(sys.executable).with_name("dtrain")


def train(run_dir: Path, preset_name: str, overrides: list[str], seed: int) -> None:
    """One `dtrain train`, timed; its output goes to `<run>.log` beside the folder."""
    command = [str(DTRAIN), "train", "--config", str(preset(preset_name)), *overrides]
    command += [f"train.seed={seed}", f"train.run_dir={run_dir}", "train.progress=false"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wall = {"wall_s": time.monotonic() - started, "command": command}
    (run_dir / "wall.json").write_text(json.dumps(wall))


def read_run(run_dir: Path) -> dict:
    """What a finished run says about the handed-over model."""
    summary = json.loads((run_dir / "summary.json").read_text())
    selection = summary["selection"]
    chosen = next(c for c in selection["candidates"] if c["rule"] == selection["rule"])
    wall = run_dir / "wall.json"
    return {
        "val_clean_accuracy": chosen.get("val_clean_accuracy"),
        "test_clean_accuracy": summary["test_best"]["clean_accuracy"],
        "test_clean_accuracy_last": summary["test_last"]["clean_accuracy"],
        "mislabel_auroc": summary.get("mislabel_auroc", {}),
        "wall_s": json.loads(wall.read_text())["wall_s"] if wall.exists() else None,
    }


def mean(values: list[float | None]) -> float | None:
    """The mean, or None where any value is missing (None, or NaN: no wrong labels to rank)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(present) if len(present) == len(values) and present else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=None)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "main_job")
    parser.add_argument("--no-train", action="store_true", help="read finished runs only")
    parser.add_argument("--out", type=Path, default=None, help="default: results/main_job.json")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train the report seeds of --candidates only: the choice was made on the tuning "
        "seeds before (on a set prepared by an earlier prepare, say)",
    )
    args = parser.parse_args(argv)
    names = args.candidates or list(CANDIDATES)
    if args.report_only and not args.candidates:
        parser.error("--report-only needs --candidates: the ones chosen before")

    def finished(name: str, seed: int) -> bool:
        return (args.runs / name / f"seed{seed}" / "summary.json").exists()

    def run(name: str, seed: int) -> dict:
        folder = args.runs / name / f"seed{seed}"
        if not finished(name, seed):
            if args.no_train:
                sys.exit(f"main_job: no finished run in {folder} (--no-train)")
            print(f"training {name}, seed {seed} in {folder}", flush=True)
            train(folder, *CANDIDATES[name][1:], seed)
        return read_run(folder)

    results: dict[str, dict] = {name: {"tuning": {}} for name in names}
    chosen = None
    if not args.report_only:
        for name in names:
            results[name]["tuning"] = {seed: run(name, seed) for seed in TUNING_SEEDS}
        tuned = {
            name: mean([r["val_clean_accuracy"] for r in results[name]["tuning"].values()])
            for name in names
            if name != "ceiling"
        }
        chosen = max(tuned, key=lambda n: tuned[n] or 0.0)
        print(f"chosen on the tuning seeds' clean val accuracy: {chosen} ({tuned[chosen]:.3f})")
    for name in names:
        # also shown: the report runs of a candidate chosen by an earlier, smaller grid
        earlier = all(finished(name, seed) for seed in REPORT_SEEDS)
        if args.report_only or name == chosen or name in ALWAYS_REPORTED or earlier:
            results[name]["report"] = {seed: run(name, seed) for seed in REPORT_SEEDS}

    table = Table(
        Column("candidate", 18, left=True),
        Column("val s0", 7, ".3f"),
        Column("val s1", 7, ".3f"),
        Column("val mean", 8, ".3f"),
        Column("test s2", 7, ".3f"),
        Column("test s3", 7, ".3f"),
        Column("test mean", 9, ".3f"),
        Column("AUROC loss", 10, ".3f"),
        Column("wall min", 8, ".1f"),
    )
    table.header()
    for name in names:
        tuning, report = results[name]["tuning"], results[name].get("report", {})
        vals = [tuning[s]["val_clean_accuracy"] if tuning else None for s in TUNING_SEEDS]
        tests = [report[s]["test_clean_accuracy"] for s in REPORT_SEEDS] if report else []
        runs = [*tuning.values(), *report.values()]
        auroc = mean([r["mislabel_auroc"].get("loss") for r in runs])
        timed = [r["wall_s"] for r in runs if r["wall_s"] is not None]
        walls = statistics.fmean(timed) if timed else None  # the runs that were timed
        results[name]["summary"] = {
            "val_clean_mean": mean(vals),
            "test_clean_mean": mean(tests) if tests else None,
            "mislabel_auroc_loss_mean": auroc,
            "wall_s_mean_of_timed": walls,
        }
        padded = tests or [None, None]
        table.row(
            name,
            *vals,
            mean(vals),
            *padded,
            mean(tests) if tests else None,
            auroc,
            None if walls is None else walls / 60,
        )
    write_result(
        "main_job",
        {
            "protocol": (
                "chosen before (--report-only)"
                if args.report_only
                else f"chosen by the mean clean val accuracy on seeds {list(TUNING_SEEDS)}"
            )
            + f"; reported by clean test accuracy on seeds {list(REPORT_SEEDS)}",
            "tuning_seeds": list(TUNING_SEEDS),
            "report_seeds": list(REPORT_SEEDS),
            "chosen": chosen,
            "candidates": {name: CANDIDATES[name][0] for name in names},
            "overrides": {
                name: [f"--config configs/{CANDIDATES[name][1]}.yaml", *CANDIDATES[name][2]]
                for name in names
            },
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()

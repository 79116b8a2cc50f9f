"""What a clinician's review of the top suspects buys: review a finished run's most suspicious
training labels, correct them, retrain with the same config, compare.

    python benchmarks/review_gain.py --before runs/con_elr_seed0 --fraction 0.1

`--before` is a finished run on a dataset with injected noise (the main job: the embedded Br35H
set, 40% symmetric). The clean labels stand in for the clinician: `dtrain review` lists the top
fraction of the train set, each row whose clean class differs from the given one gets the clean
class as its corrected_label (the others stay empty), `dtrain relabel` writes the new dataset
version and `dtrain train --config BEFORE/config.yaml data.path=NEW train.run_dir=AFTER` retrains
(extra key=value overrides are passed on). Reported: labels looked at, labels fixed, fixed per
100 looked at (and what a random pick would fix), the train noise rate and the clean test
accuracy (best and last checkpoint) before and after, and the commands. The work goes to
`--work` (default runs/review_gain/<before run's name>), keyed by the review's checksum (and
the overrides), so a rerun reuses a finished retraining and resumes an interrupted one. Prints a
table and writes benchmarks/results/review_gain.json.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import RESULTS, Column, Table, write_result

from dtrain.prepare.shard_writer import sha256
from dtrain.runs.run_folder import run_dataset


def dtrain(*argv: str, log: list[str], skip: bool = False) -> None:
    """Run `dtrain ARGV` as its own process, as a user would, unless `skip` (its result is
    there from an earlier invocation); recorded in `log` either way."""
    log.append(shlex.join(["dtrain", *argv]))
    if skip:
        print(f"finished already, reused: {log[-1]}", flush=True)
        return
    print(f"$ {log[-1]}", flush=True)
    subprocess.run([sys.executable, "-m", "dtrain", *argv], check=True)


def fill_from_clean_labels(review_csv: Path, dataset: Path) -> tuple[int, int]:
    """The stand-in clinician: corrected_label = the clean class where it differs from the given
    one, empty where they agree. Returns (rows looked at, rows corrected)."""
    classes = json.loads((dataset / "dataset.json").read_text())["classes"]
    manifest = pq.read_table(dataset / "manifest.parquet", columns=["key", "clean_label"])
    clean = dict(zip(manifest["key"].to_pylist(), manifest["clean_label"].to_pylist(), strict=True))
    with open(review_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    for row in rows:
        truth = classes[clean[row["key"]]]
        row["corrected_label"] = truth if truth != row["given_label"] else ""
    with open(review_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows), sum(1 for row in rows if row["corrected_label"])


def test_accuracy(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        which: summary[f"test_{which}"]["clean_accuracy"]
        for which in ("best", "last")
        if summary[f"test_{which}"] is not None
    }


def train_noise_rate(dataset: Path) -> float:
    return json.loads((dataset / "dataset.json").read_text())["splits"]["train"]["noise_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="a finished run (summary.json present)")
    parser.add_argument("--fraction", type=float, default=0.1, help="of the train set to review")
    parser.add_argument("--work", help="work folder (default: runs/review_gain/<run name>)")
    parser.add_argument("--out", default=str(RESULTS / "review_gain.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value for the retraining")
    args = parser.parse_args()
    before = Path(args.before)
    if not (before / "summary.json").is_file():
        raise SystemExit(f"{before} holds no summary.json: train it to the end first")
    dataset = run_dataset(before)
    noise_before = train_noise_rate(dataset)
    if noise_before == 0:
        raise SystemExit(f"{dataset} has no wrong train labels to find (noise rate 0)")
    work = Path(args.work or Path("runs/review_gain") / before.resolve().name)
    commands: list[str] = []
    started = time.perf_counter()

    review = work / "review"
    dtrain(
        "review",
        str(before),
        f"--fraction={args.fraction}",
        f"--out={review}",
        "--overwrite",
        "--no-progress",
        log=commands,
    )
    looked_at, fixed = fill_from_clean_labels(review / "review.csv", dataset)
    digest = sha256(review / "review.csv")
    relabelled = work / f"dataset_{digest[:12]}"
    retrain_key = hashlib.sha256(shlex.join([digest, *args.overrides]).encode()).hexdigest()
    after = work / f"run_{retrain_key[:12]}"
    dtrain(
        "relabel",
        str(dataset),
        str(review / "review.csv"),
        f"--out={relabelled}",
        "--overwrite",
        "--no-progress",
        log=commands,
    )
    finished = (after / "summary.json").is_file()
    resume = ["--resume"] if (after / "last.pt").is_file() and not finished else []
    retrain = ["train", *resume, "--config", str(before / "config.yaml"), f"data.path={relabelled}"]
    retrain += [f"train.run_dir={after}", "train.progress=false", *args.overrides]
    dtrain(*retrain, log=commands, skip=finished)

    accuracy = {"before": test_accuracy(before), "after": test_accuracy(after)}
    noise = {"before": noise_before, "after": train_noise_rate(relabelled)}
    table = Table(Column("", 26, left=True), Column("before", 8, ".4f"), Column("after", 8, ".4f"))
    table.header()
    table.row("train noise rate", noise["before"], noise["after"])
    for which in ("best", "last"):
        table.row(
            f"clean test accuracy ({which})",
            accuracy["before"].get(which),
            accuracy["after"].get(which),
        )
    per_100 = 100 * fixed / looked_at
    print(
        f"labels looked at {looked_at}, fixed {fixed}: {per_100:.1f} per 100 looked at "
        f"({100 * noise_before:.1f} for a random pick)"
    )
    result = {
        "before_run": str(before),
        "after_run": str(after),
        "dataset_before": str(dataset),
        "dataset_after": str(relabelled),
        "fraction": args.fraction,
        "labels_looked_at": looked_at,
        "labels_fixed": fixed,
        "fixed_per_100_looked_at": per_100,
        "fixed_per_100_random_pick": 100 * noise_before,
        "train_noise_rate": noise,
        "clean_test_accuracy": accuracy,
        "retrain_overrides": args.overrides,
        "commands": commands,
        "wall_seconds": time.perf_counter() - started,
    }
    write_result("review_gain", result, args.out)


if __name__ == "__main__":
    main()

"""Re-measure the selection rules on a subset of the study's cells after a change to what they
select from (the weight average's horizon, full windows only for `noisy_val_smoothed`), and put
the new clean test accuracy of each rule beside the study's recorded one for the same runs.

    python benchmarks/selection_remeasure.py        # iam and ce, both main cells, seeds 0-2
    python benchmarks/selection_remeasure.py --methods iam --seeds 1 2

The runs are the study's (`benchmarks/study.py`: same data, size, epochs and seeds; one core
each, two at once) in `runs/remeasure/`; a finished run is not repeated. Writes
benchmarks/results/selection_remeasure.json."""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from common import RESULTS, Column, Table, write_result
from study import MAIN_NOISES, prepare, run_one
from study_report import collect

from dtrain.train.selection import RULES


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def compare(new_rows: list[dict], old_rows: list[dict]) -> list[dict]:
    """Per (noise, method, rule): the mean clean test accuracy over the seeds both measured."""
    old = {(r["noise"], r["method"], r["seed"]): r for r in old_rows}
    cells: dict[tuple[str, str], list[tuple[dict, dict | None]]] = {}
    for row in new_rows:
        key = (row["noise"], row["method"])
        cells.setdefault(key, []).append((row, old.get((*key, row["seed"]))))
    out = []
    for (noise, method), pairs in sorted(cells.items()):
        for rule in RULES:
            column = f"rule_{rule}_acc"
            out.append(
                {
                    "noise": noise,
                    "method": method,
                    "rule": rule,
                    "seeds": sorted(new["seed"] for new, _ in pairs),
                    "new": mean([new.get(column) for new, _ in pairs]),
                    "study": mean([o.get(column) if o else None for _, o in pairs]),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["iam", "ce"])
    parser.add_argument("--noises", nargs="+", default=list(MAIN_NOISES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--runs", default="runs/remeasure")
    parser.add_argument("--data", default="data/study")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    args = parser.parse_args()

    for noise in args.noises:
        prepare(noise, Path(args.data))  # once, before runs start in parallel
    plan = [(m, n, s) for s in args.seeds for n in args.noises for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_one, *run, args) for run in plan]:
            future.result()

    new_rows = [r for r in collect(Path(args.runs)) if r["method"] in args.methods]
    old_rows = pq.read_table(RESULTS / "study" / "runs.parquet").to_pylist()
    rows = compare(new_rows, old_rows)
    table = Table(
        Column("noise", 8, left=True),
        Column("method", 8, left=True),
        Column("rule", 20, left=True),
        Column("study", 7, ".3f"),
        Column("now", 7, ".3f"),
    )
    table.header()
    for row in rows:
        table.row(row["noise"], row["method"], row["rule"], row["study"], row["new"])
    write_result("selection_remeasure", {"rows": rows, "runs": new_rows, "settings": vars(args)})


if __name__ == "__main__":
    main()

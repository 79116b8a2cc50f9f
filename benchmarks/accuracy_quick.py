"""Method vs baselines on the embedded Br35H set at 40% symmetric noise, several seeds:
clean test accuracy (mean ± std over seeds) and the AUROC of the mislabel score.

    python benchmarks/accuracy_quick.py --methods iam ce mixup --seeds 0 1 2 --epochs 30 \\
        --image-size 32

Each run is a `dtrain train --config configs/<method>.yaml` (the method's preset, so that e.g.
afm gets its feature-only attention, not just `method.name=afm`) in its own process under
runs/accuracy_quick/; a finished run (summary.json present) is not repeated, so an interrupted
benchmark continues where it stopped.
Prints a table and writes benchmarks/results/accuracy_quick.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, Column, Table, preset, write_result

from dtrain.files import write_json_atomic


def run(method: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.runs) / f"{method}_seed{seed}"
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        command = [
            sys.executable,
            "-m",
            "dtrain",
            "train",
            "--config",
            str(preset(method)),
            f"train.seed={seed}",
            f"train.epochs={args.epochs}",
            f"data.image_size={args.image_size}",
            f"train.run_dir={run_dir}",
            "train.progress=false",
            "train.refine_rounds=0",  # the methods alone; benchmarks/study.py adds the rounds
            *([f"data.path={args.data}"] if args.data else []),
            *args.overrides,
        ]
        resume = ["--resume"] if (run_dir / "last.pt").is_file() else []
        started = time.perf_counter()
        subprocess.run(command[:4] + resume + command[4:], check=True)
        seconds = time.perf_counter() - started
        summary = json.loads(summary_path.read_text())
        summary["wall_seconds"] = seconds
        write_json_atomic(summary_path, summary)
    summary = json.loads(summary_path.read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_clean = [r["val_clean_accuracy"] for r in history if r["kind"] == "epoch"]
    return {
        "method": method,
        "seed": seed,
        "test_best": summary["test_best"]["clean_accuracy"],
        "test_last": summary["test_last"]["clean_accuracy"],
        "test_last_auroc": summary["test_last"]["clean_auroc"],
        "val_clean_last5": statistics.fmean(val_clean[-5:]),
        "mislabel_auroc": summary.get("mislabel_auroc", {}),
        "wall_seconds": summary.get("wall_seconds"),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["iam", "ce", "mixup"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--data", help="dataset folder (default: embedded Br35H, 40%% noise)")
    parser.add_argument("--runs", default="runs/accuracy_quick")
    parser.add_argument("--out", default=str(RESULTS / "accuracy_quick.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    for method in args.methods:
        preset(method)  # an unknown method fails here, before any run

    runs = [run(m, s, args) for m in args.methods for s in args.seeds]
    table_rows = {}
    table = Table(
        Column("method", 14, left=True),
        Column("test acc (best val)", 22),
        Column("test acc (last)", 18),
        Column("mislabel AUROC attention", 25),
        Column("loss", 14),
    )
    table.header()
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        row = {key: mean_std([r[key] for r in mine]) for key in ("test_best", "test_last")}
        for score in ("attention", "loss"):
            values = [r["mislabel_auroc"][score] for r in mine if score in r["mislabel_auroc"]]
            row[f"mislabel_auroc_{score}"] = mean_std(values) if values else None
        table_rows[method] = row

        def fmt(pair):
            return None if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"

        table.row(
            method,
            fmt(row["test_best"]),
            fmt(row["test_last"]),
            fmt(row["mislabel_auroc_attention"]),
            fmt(row["mislabel_auroc_loss"]),
        )
    if "iam" in table_rows and "ce" in table_rows:
        gap = table_rows["iam"]["test_last"][0] - table_rows["ce"]["test_last"][0]
        print(f"iam - ce, test accuracy (last checkpoint): {100 * gap:+.1f} points (target +3)")
    result = {
        "epochs": args.epochs,
        "image_size": args.image_size,
        "seeds": args.seeds,
        "presets": {m: f"configs/{m}.yaml" for m in args.methods},
        "summary": table_rows,
        "runs": runs,
    }
    write_result("accuracy_quick", result, args.out)


if __name__ == "__main__":
    main()

"""The accuracy study: methods x label noise x seeds on the embedded Br35H set, at a size that
fits a 2-core CPU (32 px crops of images stored at 40 px, resnet10t, 12 epochs), and
cleanlab's detection and prune-and-retrain as the anchor (`benchmarks/cleanlab_anchor.py`).

    python benchmarks/study.py                      # everything, in priority order; resumable
    python benchmarks/study.py --report-only        # tables and plot from the runs so far
    python benchmarks/study.py --methods elr dividemix --noises sym0.4 inst0.3   # some cells
    python benchmarks/study.py --epochs 40 --runs runs/study40 \
        --out benchmarks/results/study_40epochs --methods iam iam_no_mixup   # the main job's budget

Each run is `benchmarks/study_run.py` in its own process, in runs/study/<noise>/<method>_seed<s>;
a run whose study.json exists is not repeated, a run cut off is started again. After every run
the table of all runs so far is rewritten: benchmarks/results/study/runs.parquet (one row per
run; rows of runs whose folders are gone are kept from it), study.md (mean ± std tables) and
study.png, and benchmarks/results/study.json."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, RESULTS, preset, write_result
from study_cells import (
    EXTRA_NOISES,
    MAIN_NOISES,
    METHODS,
    NOISES,
    WARM_VARIANT,
    compute_matched,
)

from dtrain.config import TrainConfig


def prepare(noise: str, data_root: Path) -> Path:
    """The study's copy of the embedded set with this noise, images stored at 40 px."""
    out = data_root / noise
    if not (out / "dataset.json").is_file():
        command = [sys.executable, "-m", "dtrain", "prepare", "--out", str(out)]
        command += [*NOISES[noise], "--resize", "40", "--no-progress"]
        subprocess.run(command, check=True)
    return out


def plan(seeds: list[int]) -> list[tuple[str, str, int]]:
    """(method, noise, seed) in the order that makes partial results most useful: every
    method once on the two main noise kinds, then the other seeds, then the extra kinds."""
    first, rest = seeds[:1], seeds[1:]
    runs = [(m, n, s) for s in first for n in MAIN_NOISES for m in METHODS]
    runs += [(m, n, s) for s in first for n in MAIN_NOISES for m in WARM_VARIANT]
    runs += [(m, n, s) for s in rest for n in MAIN_NOISES for m in METHODS]
    runs += [(m, n, s) for s in first for n in EXTRA_NOISES for m in METHODS]
    return runs


def run_one(method: str, noise: str, seed: int, args: argparse.Namespace) -> None:
    run_dir = Path(args.runs) / noise / f"{method}_seed{seed}"
    if (run_dir / "study.json").is_file():
        return
    if run_dir.exists():  # cut off: its per-epoch test scores are incomplete, start again
        shutil.rmtree(run_dir)
    name, extra = {**METHODS, **WARM_VARIANT}[method]
    overrides = [
        f"data.path={prepare(noise, Path(args.data))}",
        f"data.image_size={args.image_size}",
        f"model.backbone={args.backbone}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        "train.refine_rounds=0",  # the methods as they are; rounds where `extra` asks
        *extra,
        *compute_matched(name, args.epochs),
    ]
    print(f"[{time.strftime('%H:%M:%S')}] {noise} {method} seed {seed}", flush=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)  # one core each beats sharing two
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as handle:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "study_run.py"),
                str(run_dir),
                str(preset(name)),
                *overrides,
            ],
            check=True,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--runs", default="runs/study")
    parser.add_argument("--data", default="data/study")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-cleanlab", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--out",
        default=str(RESULTS / "study"),
        help="its tables (default benchmarks/results/study; another budget, another folder)",
    )
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *WARM_VARIANT])
    parser.add_argument("--noises", nargs="+", choices=list(NOISES))
    args = parser.parse_args()
    from study_report import write_report

    if not args.report_only:
        for noise in NOISES:
            prepare(noise, Path(args.data))  # once, before runs start in parallel
        runs = plan(args.seeds)
        if args.methods or args.noises:  # some cells only, without the cleanlab anchor
            runs = [
                (m, n, s)
                for m, n, s in runs
                if m in (args.methods or m) and n in (args.noises or n)
            ]
            with ThreadPoolExecutor(args.jobs) as pool:
                for future in [pool.submit(run_one, *run, args) for run in runs]:
                    future.result()
                    write_report(Path(args.runs), TrainConfig.select, Path(args.out))
        else:
            anchor_after = runs.index(("iam+rounds(warm)", MAIN_NOISES[-1], args.seeds[0]))
            with ThreadPoolExecutor(args.jobs) as pool:
                # the anchor needs the first seed's iam runs: start it once those are done
                first = [pool.submit(run_one, *run, args) for run in runs[: anchor_after + 1]]
                for future in first:
                    future.result()
                write_report(Path(args.runs), TrainConfig.select, Path(args.out))
                if not args.no_cleanlab:
                    from cleanlab_anchor import run_anchor

                    anchors = [
                        pool.submit(run_anchor, n, args.seeds[0], args, prepare(n, Path(args.data)))
                        for n in MAIN_NOISES
                    ]
                rest = [pool.submit(run_one, *run, args) for run in runs[anchor_after + 1 :]]
                for future in [*rest, *(anchors if not args.no_cleanlab else [])]:
                    future.result()
                    write_report(Path(args.runs), TrainConfig.select, Path(args.out))
    summary = write_report(Path(args.runs), TrainConfig.select, Path(args.out))
    write_result(Path(args.out).name, {**summary, "settings": vars(args)})


if __name__ == "__main__":
    main()

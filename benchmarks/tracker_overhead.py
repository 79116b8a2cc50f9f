"""What a tracker costs a run: step time and whole-run time with `train.trackers=[tensorboard]`
(the default) against `[tensorboard,mlflow]` logging to a real MLflow tracking server on
localhost (sqlite store, local artifact root), as a hospital's on-premises server would be used.

    python benchmarks/tracker_overhead.py [--epochs 2] [--repeats 3] [--image-size 64]
        [--backbone resnet18] [--data PATH]

Each (variant, repeat) trains in its own process through the real trainer, round-robin over
the variants so that drift on a shared machine hits both alike. Step time: the interval
between consecutive optimiser steps of one epoch (`on_step`), past the run's first 5 steps; the
mean includes the log steps, the median is a plain step's. A tracker's step records are held
back until a checkpoint covers them and go out with it (at each epoch's end here), so most of
their cost lands in the run time. Run time: `dtrain.train.train` end to end, the tracked run's
start, its end (test metrics, artifacts) and the test evaluation included. The ratio column is each
variant's median over repeats divided by the default's, measured in the same run.
Writes benchmarks/results/tracker_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import Column, Table, device_name, slug, write_result

VARIANTS = {"tensorboard": "[tensorboard]", "mlflow": "[tensorboard,mlflow]"}
SKIP_STEPS = 5  # the first steps pay for the loader's start and the allocator's warm-up


def measure_one(overrides: list[str]) -> dict:
    """One training in this process: its step intervals and the fit's wall time."""
    from dtrain.config import load_config
    from dtrain.train import train

    stamps: list[tuple[int, float]] = []  # (epoch counted from 1, time) after each step
    started = time.perf_counter()
    train(
        load_config(None, overrides),
        on_step=lambda info: stamps.append((math.ceil(info.epoch), time.perf_counter())),
    )
    run_s = time.perf_counter() - started
    # within an epoch only: the first step of the next one waits for val and the checkpoint
    intervals = [b - a for (ea, a), (eb, b) in itertools.pairwise(stamps[SKIP_STEPS:]) if ea == eb]
    return {
        "steps": len(stamps),
        "step_mean_s": statistics.fmean(intervals),
        "step_median_s": statistics.median(intervals),
        "run_s": run_s,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{root / 'store.db'}"),
            *("--default-artifact-root", str(root / "artifacts"), "--no-serve-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return server, uri
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit(
                    f"the MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.5)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the variants")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--data", help="a dtrain prepare folder (default: the embedded set)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one run's overrides, as JSON
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", help="result file (default: results/tracker_overhead_<device>.json)"
    )
    args = parser.parse_args()
    if args.one:
        Path(args.to).write_text(json.dumps(measure_one(json.loads(args.one))))
        return

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    table = Table(
        Column("trackers", 22, left=True),
        Column("repeat", 6, "d"),
        Column("steps", 5, "d"),
        Column("step mean s", 11, ".4f"),
        Column("step median s", 13, ".4f"),
        Column("run s", 7, ".1f"),
    )
    with tempfile.TemporaryDirectory(prefix="dtrain-trackers-") as tmp:
        server, uri = start_mlflow_server(Path(tmp))
        try:
            table.header()
            for repeat in range(args.repeats):
                for variant, trackers in VARIANTS.items():
                    run_dir = Path(tmp) / f"{variant}_{repeat}"
                    overrides = [
                        f"model.backbone={args.backbone}",
                        "model.pretrained=false",
                        f"data.image_size={args.image_size}",
                        f"train.epochs={args.epochs}",
                        "train.progress=false",
                        f"train.run_dir={run_dir}",
                        f"train.trackers={trackers}",
                        *([f"data.path={args.data}"] if args.data else []),
                    ]
                    out = Path(tmp) / f"{variant}_{repeat}.json"
                    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
                    env["MLFLOW_EXPERIMENT_NAME"] = "tracker_overhead"
                    subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--one",
                            json.dumps(overrides),
                            "--to",
                            str(out),
                        ],
                        check=True,
                        env=env,
                        stdout=subprocess.DEVNULL,
                    )
                    result = json.loads(out.read_text())
                    runs[variant].append(result)
                    table.row(
                        trackers,
                        repeat,
                        result["steps"],
                        result["step_mean_s"],
                        result["step_median_s"],
                        result["run_s"],
                    )
        finally:
            server.terminate()
            server.wait(30)

    base = runs["tensorboard"]
    summary = {
        variant: {key: median_of(rs, key) for key in ("step_mean_s", "step_median_s", "run_s")}
        | {
            f"{key}_ratio": median_of(rs, key) / median_of(base, key)
            for key in ("step_mean_s", "step_median_s", "run_s")
        }
        for variant, rs in runs.items()
    }
    print()
    ratios = Table(
        Column("trackers", 22, left=True),
        Column("step mean ×", 11, ".3f"),
        Column("step median ×", 13, ".3f"),
        Column("run ×", 7, ".3f"),
    )
    ratios.header()
    for variant, s in summary.items():
        ratios.row(
            VARIANTS[variant], s["step_mean_s_ratio"], s["step_median_s_ratio"], s["run_s_ratio"]
        )
    write_result(
        "tracker_overhead",
        {
            "settings": {k: v for k, v in vars(args).items() if k not in ("one", "to")},
            "runs": runs,
            "summary": summary,
        },
        args.out
        or Path(__file__).parent / "results" / f"tracker_overhead_{slug(device_name())}.json",
    )


if __name__ == "__main__":
    main()

"""Training throughput of the method at 1 and 2 processes (torchrun, same per-rank batch), on the
embedded Br35H shards; the ratio says how close to linear the data-parallel scaling is.

    python benchmarks/scaling.py [--processes 1 2] [--epochs 2] [--image-size 64] [--method iam]

Each point is a real `dtrain train --config configs/<method>.yaml` under torchrun; images/s is
the mean over the epochs after the first (start-up excluded), from the run's metrics.jsonl.
Writes benchmarks/results/scaling_<device>.json with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Column, Table, device_name, preset, slug, write_result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(processes: int, args: argparse.Namespace, workdir: Path) -> float:
    run_dir = workdir / f"p{processes}"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun),
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "dtrain",
        "train",
        "--config",
        str(preset(args.method)),
        f"train.run_dir={run_dir}",
        f"train.epochs={args.epochs}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "train.progress=false",
        "method.score_epochs=1",
        "train.refine_rounds=0",  # one training: throughput, not the clean-up rounds
        *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    subprocess.run(command, check=True, env=env)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in epochs if r["kind"] == "epoch"][1:]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--method", default="iam", help="a preset in configs/ (default: iam)")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    preset(args.method)  # an unknown method fails here, before any run
    with tempfile.TemporaryDirectory() as tmp:
        rates = {p: measure(p, args, Path(tmp)) for p in args.processes}
    base = rates[args.processes[0]]
    table = Table(
        Column("processes", 9, "d"),
        Column("images/s", 10, ".1f"),
        Column("speed-up", 9, ".2f"),
        Column("efficiency", 11, ".2f"),
    )
    table.header()
    for p, rate in rates.items():
        table.row(p, rate, rate / base, rate / base / p)
    device = device_name()
    write_result(
        f"scaling_{slug(device)}",
        {
            "device": device,
            "method": args.method,
            "image_size": args.image_size,
            "batch_size_per_rank": args.batch_size,
            "epochs": args.epochs,
            "images_per_s": rates,
        },
    )


if __name__ == "__main__":
    main()

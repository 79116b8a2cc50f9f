"""`dtrain prepare` throughput per core against plain decode+encode, for each engine.

On one synthetic chest-film set (benchmarks/synthetic_patients.py, 64 px JPEGs) it times:
- the floor: one process that decodes every image with PIL and encodes it again as JPEG (what
  any converter must at least do), and one that decodes only;
- `dtrain prepare` (a fresh output folder each time, no progress bars) on 1 and 2 processes, on
  a private local Ray with 2 workers that the run starts itself, and on a 2-CPU Ray cluster
  started beforehand with `ray start --head` and joined with `--address` (as on a cluster), with
  the image bytes kept as they are and with `--resize`.
Each run is a subprocess; wall time includes start-up (a private Ray's included). The shards of
every engine are compared byte for byte with the one-process run's.

    python benchmarks/prepare_throughput.py [--n 20000] [--resize 64]
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Column, Table, write_result
from PIL import Image
from synthetic_patients import generate


def floor(folder: Path, encode: bool) -> float:
    """Seconds for one process to decode (and re-encode) every image of the set."""
    with open(folder / "manifest.csv", newline="") as handle:
        paths = [folder / r["path"] for r in csv.DictReader(handle)]
    start = time.perf_counter()
    for path in paths:
        image = Image.open(io.BytesIO(path.read_bytes()))
        image.load()
        if encode:
            image.save(io.BytesIO(), "JPEG", quality=95)
    return time.perf_counter() - start


def prepare(folder: Path, out: Path, extra: list[str], env: dict) -> float:
    command = [sys.executable, "-m", "dtrain", "prepare", str(folder / "manifest.csv")]
    command += ["--classes", "normal,nodule", "--out", str(out), "--no-progress", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_head(env: dict, cores: int) -> str:
    """A Ray head on this node, as `ray start` makes one on a cluster's first node."""
    address = f"127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head"]
    command += [f"--port={address.split(':')[1]}", f"--num-cpus={cores}"]
    command += ["--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return address


def stop_processes_with(entry: str) -> None:
    """Kill the processes whose environment holds `entry` (never `ray stop`: it would stop every
    Ray on this machine, other users' too)."""
    marker = entry.encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--resize", type=int, default=64)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "throughput")
    args = parser.parse_args()

    folder = args.work / f"n{args.n}_seed3"
    if not (folder / "manifest.csv").is_file():
        generate(folder, args.n, seed=3, workers=2, progress=True)
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must be short
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    table = Table(
        Column("what", 34, left=True),
        Column("cores", 5, "d"),
        Column("seconds", 8, ".1f"),
        Column("img/s", 7, ".0f"),
        Column("img/s/core", 10, ".0f"),
        Column("vs floor/core", 13, ".2f"),
        Column("same bytes", 10),
    )
    table.header()
    rows = []

    def add(what: str, cores: int, seconds: float, floor_rate: float, same: bool | None) -> None:
        rate = args.n / seconds
        rows.append(
            {"what": what, "cores": cores, "seconds": seconds, "images_per_s": rate, "same": same}
        )
        table.row(what, cores, seconds, rate, rate / cores, rate / cores / floor_rate, same)

    decode_rate = args.n / floor(folder, encode=False)
    add("floor: PIL decode", 1, args.n / decode_rate, decode_rate, None)
    floor_rate = args.n / floor(folder, encode=True)
    add("floor: PIL decode + JPEG encode", 1, args.n / floor_rate, floor_rate, None)
    outputs = Path(tempfile.mkdtemp(prefix="prepare_throughput"))
    try:
        address = start_ray_head(env, 2)
        for resize in ([], ["--resize", str(args.resize)]):
            tag = f" --resize {args.resize}" if resize else ""
            runs = [
                ("process", 1, []),
                ("process", 2, []),
                ("ray", 2, ["--engine", "ray"]),
                ("ray cluster", 2, ["--engine", "ray", "--address", address]),
            ]
            first = None
            for engine, cores, extra in runs:
                out = outputs / f"{engine.replace(' ', '_')}{cores}{'r' if resize else ''}"
                seconds = prepare(folder, out, [*resize, "--workers", str(cores), *extra], env)
                same = None if first is None else same_shards(first, out)
                first = first or out
                add(f"prepare {engine} x{cores}{tag}", cores, seconds, floor_rate, same)
    finally:
        stop_processes_with(f"RAY_TMPDIR={ray_tmp}")
        shutil.rmtree(outputs, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    write_result(
        "prepare_throughput",
        {"images": args.n, "side": 64, "floor_decode_encode_per_s": floor_rate, "runs": rows},
    )


if __name__ == "__main__":
    main()

"""A rank of a 2-process run dies (kill -9 mid-epoch): the survivor stops within seconds with an
error naming the lost rank, instead of waiting out `train.dist_timeout_s`, and `--resume` of the
whole run finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, processes_with_env, small_overrides, stripes_dataset

ROOT = REPO
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("dead"), 64, shard_size=8)


def logged_a_step(run_dir: Path) -> bool:
    log = run_dir / "metrics.jsonl"
    return log.exists() and '"kind": "step"' in log.read_text()


def rank_pid(marker: str, rank: int) -> int | None:
    for pid in processes_with_env(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return pid
    return None


@pytest.mark.multiproc
def test_the_survivor_names_the_dead_rank_within_seconds_and_resume_finishes(tiny, tmp_path):
    marker = f"DTRAIN_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", marker.split("=")[0]: marker.split("=")[1]}
    run_dir = tmp_path / "run"
    args = small_overrides(
        tiny,
        run_dir,
        8,
        "train.log_every=1",
        "train.checkpoint_every_steps=2",
        "train.dist_timeout_s=300",
    )
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dtrain",
        "train",
    ]
    job = subprocess.Popen(
        [*command, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not logged_a_step(run_dir) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        victim = rank_pid(marker, 1)
        assert victim is not None and logged_a_step(run_dir), job.communicate()[0][-3000:]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        output = job.communicate(timeout=120)[0]
        took = time.monotonic() - killed_at
    finally:
        job.kill()
    assert job.returncode != 0
    survivor = [line for line in output.splitlines() if "error: rank 0 lost rank 1" in line]
    assert survivor and f"pid {victim}" in survivor[0], output[-3000:]
    assert "--resume" in survivor[0]
    assert took < 30, f"{took:.0f} s from the kill to the end of the run"  # not 300
    resumed = subprocess.run(
        [*command, "--resume", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2

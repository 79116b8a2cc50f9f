"""`dtrain tune` without `--address` on a node where other Ray clusters have been: a private
local Ray every time, never the one Ray's address file names (a gone Ray-on-SLURM head, or
another user's running `ray start`); a Ray that cannot start is one line. Real Ray clusters and
real searches throughout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port, kill_processes_with_env, stripes_dataset
from ray_search import BIN, ROOT, run, tune_command, write_search

pytest.importorskip("ray.tune", reason="the tune extra (pip install -e .[tune]) is not installed")

ADDRESS_FILE = "ray_current_cluster"  # where `ray start` leaves its address, in Ray's temp folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("tune_address"), 48, shard_size=16)


def one_trial_search(folder: Path) -> Path:
    """One trial of one epoch under the default ASHA (grace period 2, more than the epochs)."""
    return write_search(folder / "s.yaml", {"method.temperature": {"choice": [0.5]}}, num_samples=1)


def assert_one_trial_done(storage: Path) -> None:
    trials = pd.read_parquet(storage / "s" / "trials.parquet")
    assert trials["status"].tolist() == ["done"] and trials["epochs"].tolist() == [1]


@pytest.mark.ray
def test_a_stale_address_file_is_not_joined_and_one_epoch_runs_under_asha(tiny, tmp_path, ray_env):
    """What a Ray-on-SLURM job's head leaves behind: the address of a head that is gone."""
    ray_dir = Path(ray_env["RAY_TMPDIR"]) / "ray"
    ray_dir.mkdir()
    (ray_dir / ADDRESS_FILE).write_text(f"127.0.0.2:{free_port()}")
    result = run(
        tune_command(one_trial_search(tmp_path), tiny, tmp_path / "out", "train.epochs=1"), ray_env
    )
    assert "search.grace_period=2 cut to the 1 epoch(s)" in result.stdout
    assert_one_trial_done(tmp_path / "out")


def drivers_of(address: str, env: dict) -> tuple[list[str], str]:
    """Every driver (job) a Ray cluster has had, and the one of this probe."""
    probe = (
        "import json, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        "me = ray.get_runtime_context().get_job_id()\n"
        "print(json.dumps([[j['JobID'] for j in ray._private.state.jobs()], me]))\n"
    )
    result = run([sys.executable, "-c", probe], env, timeout=120)
    drivers, me = json.loads(result.stdout.strip().splitlines()[-1])
    return sorted(drivers), me


@pytest.mark.ray
def test_another_users_running_ray_is_not_joined(tiny, tmp_path, ray_env):
    """A `ray start --head` on this node (its address in Ray's address file and in
    RAY_ADDRESS, as its user would have it): the search starts its own Ray beside it."""
    port = free_port()
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=1",
        "--include-dashboard=false",
        "--object-store-memory=80000000",
        "--disable-usage-stats",
    ]
    env = {**ray_env, "RAY_AUTH_MODE": "disabled"}
    run(head, env)  # stopped by the `ray_env` fixture (`ray stop` would stop every Ray here)
    address = (Path(env["RAY_TMPDIR"]) / "ray" / ADDRESS_FILE).read_text().strip()
    assert address.endswith(f":{port}")
    drivers, first = drivers_of(address, env)
    assert drivers == [first]
    command = tune_command(one_trial_search(tmp_path), tiny, tmp_path / "out", "train.epochs=1")
    result = run(command, {**env, "RAY_ADDRESS": address})
    assert "Started a local Ray instance" in result.stdout + result.stderr
    assert_one_trial_done(tmp_path / "out")
    drivers, second = drivers_of(address, env)
    assert drivers == sorted([first, second])  # the probes only: the search never drove it


@pytest.mark.ray
def test_a_ray_that_cannot_start_is_one_line(tiny, tmp_path, ray_env):
    """A temp folder too deep for Ray's sockets (as a cluster's TMPDIR can be): the local Ray
    cannot start, and the user reads one line that says what to change, not a traceback."""
    deep = Path(ray_env["RAY_TMPDIR"]) / ("x" * 100)
    deep.mkdir()
    env = {**ray_env, "RAY_TMPDIR": str(deep)}
    command = tune_command(one_trial_search(tmp_path), tiny, tmp_path / "out")
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
        )
    finally:
        kill_processes_with_env(f"RAY_TMPDIR={deep}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dtrain tune: error: a local Ray did not start (")
    assert "AF_UNIX path length" in last and "point RAY_TMPDIR at another short path" in last

"""The engines write the same dataset: one process, a pool of processes, and Ray workers on a
private local Ray or on a running Ray cluster give byte-identical shards, manifest and
dataset.json for the same request; `--shard-bytes` is planned before writing, so pooled shards
are cut where one process cuts them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.shard_writer import TAR_BLOCK
from tests.conftest import write_folder

CLUSTER_CPUS = (os.cpu_count() or 1) + 3  # more than this machine has: counted from the cluster


def dataset_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    return write_folder(root / "images", {"a": 40, "b": 35}, fmt="jpg", duplicates=4)


def test_one_process_and_a_pool_write_the_same_bytes(scans, tmp_path):
    common = {"source": str(scans), "shard_size": 7, "progress": False, "noise": "symmetric"}
    one = prepare(PrepareConfig(out=str(tmp_path / "one"), workers=1, **common))
    pool = prepare(PrepareConfig(out=str(tmp_path / "pool"), workers=2, **common))
    written = dataset_bytes(one)
    assert len([n for n in written if n.endswith(".tar")]) >= 9
    assert dataset_bytes(pool) == written


def test_shard_bytes_cut_the_same_in_a_pool_and_no_shard_passes_the_limit(scans, tmp_path):
    limit = 40 * TAR_BLOCK
    common = {"source": str(scans), "shard_bytes": limit, "resize": 24, "progress": False}
    one = prepare(PrepareConfig(out=str(tmp_path / "one"), workers=1, **common))
    pool = prepare(PrepareConfig(out=str(tmp_path / "pool"), workers=2, **common))
    assert dataset_bytes(pool) == dataset_bytes(one)
    tars = sorted(one.glob("*.tar"))
    assert len(tars) > 3
    # the limit is a whole number of tar records (10 KiB), so their padding cannot pass it
    assert max(p.stat().st_size for p in tars) <= limit


@pytest.mark.ray
def test_ray_workers_write_the_same_bytes_as_one_process(scans, tmp_path, ray_env):
    common = ["--shard-size", "7", "--noise", "symmetric", "--no-progress"]
    one = prepare(
        PrepareConfig(
            source=str(scans),
            out=str(tmp_path / "one"),
            workers=1,
            shard_size=7,
            noise="symmetric",
            progress=False,
        )
    )
    dtrain = [sys.executable, "-m", "dtrain", "prepare", str(scans)]
    done = subprocess.run(
        [*dtrain, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2", *common],
        env={**ray_env, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert dataset_bytes(tmp_path / "ray") == dataset_bytes(one)


@pytest.mark.ray
def test_on_a_running_cluster_prepare_sizes_by_its_cpus_and_writes_the_same_bytes(
    scans, tmp_path, ray_env
):
    """`ray start --head` with more CPUs than this machine has cores, as a cluster has: prepare
    joins it with --address, counts the cluster's CPUs as its default workers, and writes what
    one process writes."""
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    env = {**ray_env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.getcwd()}
    head = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={address.split(':')[1]}",
        f"--num-cpus={CLUSTER_CPUS}",
        "--include-dashboard=false",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    subprocess.run(head, env=env, capture_output=True, check=True, timeout=300)
    probe = (
        "from dtrain.prepare.engines import default_workers\n"
        f"print(default_workers('ray', {address!r}))\n"
    )
    counted = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert counted.stdout.strip().splitlines()[-1] == str(CLUSTER_CPUS), counted.stderr[-3000:]

    one = prepare(
        PrepareConfig(source=str(scans), out=str(tmp_path / "one"), workers=1, progress=False)
    )
    command = [
        sys.executable,
        "-m",
        "dtrain",
        "prepare",
        str(scans),
        "--out",
        str(tmp_path / "ray"),
    ]
    done = subprocess.run(
        [*command, "--engine", "ray", f"--address={address}", "--workers", "2", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert dataset_bytes(tmp_path / "ray") == dataset_bytes(one)

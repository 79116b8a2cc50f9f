"""The Ray template on a real two-node SLURM cluster (tests/slurm_cluster.py) leaves its nodes as
it found them: no Ray process and no Ray address file (`ray_current_cluster`, which a later
`ray.init()` on the node would follow to the gone head)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import kill_processes_with_env, processes_with_env, small_overrides, stripes_dataset
from slurm_cluster import finished, job_id, launch

pytest.importorskip("ray.tune", reason="the tune extra (pip install -e .[tune]) is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("tune_slurm"), 64, shard_size=8)


@pytest.mark.slurm
def test_the_ray_template_stops_its_ray_and_leaves_no_address_file(
    cluster, tiny, submit_env, tmp_path
):
    search = tmp_path / "s.yaml"
    search.write_text(
        yaml.safe_dump(
            {"space": {"method.temperature": {"choice": [0.5]}}, "search": {"scheduler": "none"}}
        )
    )
    overrides = small_overrides(tiny, tmp_path / "unused", 8, "train.epochs=1")
    overrides = [o for o in overrides if "run_dir" not in o]
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths stay short
    env = {**submit_env, "RAY_TMPDIR": ray_tmp}
    try:
        submitted = launch(
            env,
            "tune",
            str(search),
            "--nodes",
            "2",
            *overrides,
            f"--storage-path={tmp_path / 'searches'}",
            "--object-store-mb=128",
            "--num-samples=1",
        )
        folder = tmp_path / "searches" / "s"
        log = folder / f"slurm-{job_id(submitted)}.out"
        finished(cluster, job_id(submitted), log)
        left = processes_with_env(f"RAY_TMPDIR={ray_tmp}")
        address_files = sorted(p.name for p in Path(ray_tmp).glob("ray/ray_current_cluster"))
    finally:
        kill_processes_with_env(f"RAY_TMPDIR={ray_tmp}")
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text()
    assert text.count("Ray runtime started.") == 2  # the head, then the worker
    assert pd.read_csv(folder / "trials.csv")["status"].tolist() == ["done"]
    assert address_files == [], text[-3000:]
    assert left == [], text[-3000:]

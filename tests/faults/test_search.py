"""A search whose trial process is killed -9 mid-trial (a real local Ray cluster, real dtrain
runs): the trial is retried from its last checkpoint and the search completes, the other trial's
results intact."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import processes_with_env, stripes_dataset
from ray_search import ROOT, epoch_lines, epoch_records, tune_command, write_search

pytest.importorskip("ray.tune", reason="the tune extra (pip install -e .[tune]) is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("search"), 48, shard_size=16)


def all_reported(folder: Path, trials: int) -> bool:
    """Whether Tune has taken in every trial's first report (its result.json; a checkpoint
    folder alone may still be being copied)."""
    results = list(folder.glob("run_trial_*/result.json"))
    return len(results) == trials and all(r.read_text().strip() for r in results)


@pytest.mark.ray
def test_a_killed_trial_is_retried_and_the_other_trial_is_untouched(tiny, tmp_path, ray_env):
    search = write_search(
        tmp_path / "search.yaml",
        {"method.temperature": {"choice": [0.3, 0.5]}},
        algorithm="grid",
        scheduler="none",
        max_concurrent=2,
        max_failures=1,
    )
    command = tune_command(search, tiny, tmp_path / "results", "train.epochs=3")
    with open(tmp_path / "search.log", "w") as log:
        driver = subprocess.Popen(
            command, env=ray_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
    folder = tmp_path / "results" / "search"
    deadline = time.monotonic() + 300
    while not all_reported(folder, 2):  # epoch 1 and its checkpoint registered by Tune
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    first_epochs = {d.name: epoch_lines(d)[0] for d in (folder / "trials").iterdir()}
    victim = processes_with_env(f"RAY_TMPDIR={ray_env['RAY_TMPDIR']}", "ray::ImplicitFunc")[0]
    os.kill(victim, signal.SIGKILL)
    assert driver.wait(timeout=400) == 0, (tmp_path / "search.log").read_text()[-3000:]
    failed = [p.parent for p in folder.glob("run_trial_*/error.txt")]
    assert len(failed) == 1  # exactly one trial failed, once, and was retried
    for run_dir in (folder / "trials").iterdir():
        # each epoch once (a retry cuts the log back to its checkpoint), epoch 1 never rerun
        assert epoch_records(run_dir) == [1, 2, 3], run_dir.name
        assert epoch_lines(run_dir)[0] == first_epochs[run_dir.name]
        assert (run_dir / "summary.json").is_file()
    assert pd.read_parquet(folder / "trials.parquet")["status"].tolist() == ["done", "done"]

"""Preemption on a real SLURM cluster (tests/slurm_cluster.py): the job's warning signal (USR1 to
the batch shell, as `--signal=B:USR1@300` sends it) at three different points, each followed by
a checkpoint, a requeue and a resume; the job ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import small_overrides, stripes_dataset
from slurm_cluster import ENDED, finished, job_id, launch, logged_a_step, wait_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("preempt"), 64, shard_size=8)


def epochs_logged(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(json.loads(line)["kind"] == "epoch" for line in lines if line.endswith("}"))


def running_again(cluster, job: str, restarts: int) -> bool:
    info = cluster.wait_job(job, {"RUNNING", *ENDED}, 120)  # releases the requeue's hold
    return info["Restarts"] == str(restarts) and info["JobState"] == "RUNNING"


@pytest.mark.slurm
def test_three_warnings_requeue_three_times_and_end_with_the_uninterrupted_weights(
    cluster, tiny, submit_env, tmp_path
):
    args = ["data.batch_size=4", "train.epochs=3", "train.log_every=2", "method.name=iam"]
    runs = {}
    for name in ("straight", "warned"):
        run_dir = tmp_path / name
        overrides = small_overrides(tiny, run_dir, 4, *args)
        job = job_id(launch(submit_env, "--nodes", "2", *overrides))
        log = run_dir / f"slurm-{job}.out"
        if name == "warned":
            # 1: mid-epoch 1, once a step was logged
            wait_for(lambda d=run_dir: logged_a_step(d), 180, "logged step")
            cluster.run("scancel", "--batch", "--signal=USR1", job)
            # 2: as soon as the requeued job's script runs again, while its ranks are starting
            # (not before: a signal that beats a script's first `trap` kills any batch script)
            wait_for(lambda j=job: running_again(cluster, j, 1), 300, "first requeue")
            wait_for(lambda j=job, f=log: f"job {j} start 2:" in f.read_text(), 60, "restart")
            cluster.run("scancel", "--batch", "--signal=USR1", job)
            # 3: once the third start has logged epoch 2: early in the last epoch
            wait_for(lambda j=job: running_again(cluster, j, 2), 300, "second requeue")
            wait_for(lambda d=run_dir: epochs_logged(d) >= 2, 240, "epoch 2")
            cluster.run("scancel", "--batch", "--signal=USR1", job)
        runs[name] = (finished(cluster, job, log, 400), log.read_text())
    info, text = runs["warned"]
    assert runs["straight"][0]["Restarts"] == "0" and info["Restarts"] == "3", text[-3000:]
    stops = [  # (epoch, batch)
        (epoch, batch)
        for batch, epoch in re.findall(r"stopped after batch (\d+) of \d+ in epoch (\d+)", text)
    ]
    assert len(stops) == 3 and len(set(stops)) == 3, stops  # three different points
    # the warning during start-up was kept, not fatal: it stopped at the first log step
    assert stops[1] == (stops[0][0], str(int(stops[0][1]) + 2)), stops
    assert text.count("--resume auto: resuming") == 3
    # each warning was caught once, by the batch shell, however early it came
    assert text.count("SIGUSR1: asking the ranks to checkpoint and stop") == 3, text[-3000:]
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in runs)
    assert a["state"]["step"] == b["state"]["step"] == 3 * 12  # 45 images per rank, 4 a batch
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key

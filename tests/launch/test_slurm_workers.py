"""A TERM to every process of a job step on a real SLURM cluster (tests/slurm_cluster.py), while
the ranks read through DataLoader workers: `scancel --signal=TERM`, `scontrol requeue` and a
preemption with PreemptMode=REQUEUE all signal the workers as well as the ranks. The workers
leave the signal to their rank, which checkpoints; the job requeues and ends with the weights of
an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import processes_with_env, small_overrides, stripes_dataset
from slurm_cluster import finished, job_id, launch, logged_a_step, wait_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """12 train shards: 2 ranks x 2 workers read 3 each."""
    return stripes_dataset(tmp_path_factory.mktemp("slurm_workers"), 64, shard_size=8)


def reading_with_workers(job: str, run_dir: Path) -> bool:
    """A step logged, 2 ranks (`python -m dtrain`) and their 2 workers each running: the
    workers and each rank's fork server run `multiprocessing.forkserver` with
    `dtrain.dataset.worker_server`, 2 servers and 4 workers; so that the TERM finds workers."""
    ranks = forked = 0
    for pid in processes_with_env(f"SLURM_JOB_ID={job}"):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone
        ranks += b"dtrain" in args[1:4]  # python [-u] -m dtrain
        forked += any(b"dtrain.dataset.worker_server" in a for a in args)
    return ranks == 2 and forked >= 6 and logged_a_step(run_dir)


@pytest.mark.slurm
def test_a_term_to_the_whole_step_with_loader_workers_requeues_with_the_same_weights(
    cluster, tiny, submit_env, tmp_path
):
    args = ["data.num_workers=2", "train.epochs=2", "train.log_every=2"]
    runs = {}
    for name in ("straight", "termed"):
        run_dir = tmp_path / name
        job = job_id(launch(submit_env, "--nodes", "2", *small_overrides(tiny, run_dir, 4, *args)))
        log = run_dir / f"slurm-{job}.out"
        if name == "termed":
            wait_for(lambda d=run_dir, j=job: reading_with_workers(j, d), 180, "loader workers")
            cluster.run("scancel", "--signal=TERM", job)  # every process of every step
        runs[name] = (finished(cluster, job, log, 400), log.read_text())
    info, text = runs["termed"]
    assert "is killed by signal" not in text, text[-3000:]
    assert runs["straight"][0]["Restarts"] == "0" and info["Restarts"] == "1", text[-3000:]
    assert re.search(r"the ranks stopped at a checkpoint", text), text[-3000:]
    assert text.count("--resume auto: resuming") == 1
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in runs)
    assert a["state"]["step"] == b["state"]["step"] == 2 * 12  # 45 images per rank, 4 a batch
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key

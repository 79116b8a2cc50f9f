"""`dtrain launch slurm` on a real two-node SLURM cluster (tests/slurm_cluster.py): every
launcher trains across both nodes and exits 0; GPU requests of both forms are granted; requests
that cannot fit are refused before submitting; a warning to the ranks themselves is kept; a
TERM through torchrun requeues; a cancelled job stays cancelled; the Ray template runs a search
on a head and a worker. (Three warnings, one during start-up, and the weights after them:
tests/faults.)

Jobs are submitted from a shell without the venv (PATH holds only the system's folders): the job
script sets its own environment."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    catches,
    kill_processes_with_env,
    processes_with_env,
    small_overrides,
    stripes_dataset,
)
from slurm_cluster import ENDED, NODES, ROOT, finished, job_id, launch, logged_a_step, wait_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """128 stripe images in shards of 8: every split feeds up to 4 ranks."""
    return stripes_dataset(tmp_path_factory.mktemp("slurm_data"), 64, shard_size=8)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return small_overrides(data, run_dir, 8, "train.epochs=1", *extra)


def ranks_by_node(log_text: str) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    # not anchored at line starts: srun may merge two tasks' lines into one
    for rank, node in re.findall(r"rank (\d+) of \d+ on node (n\d+):", log_text):
        found.setdefault(node, set()).add(int(rank))
    return found


@pytest.mark.parametrize(
    "launcher, gpus, ranks_per_node",
    [
        ("torchrun", [], 1),  # CPU nodes: one process per node
        ("srun", ["--gpus-per-node", "a100:1"], 1),  # typed request: one task per GPU
        ("torchrun", ["--gres", "gpu:2"], 2),  # --gres request: two processes per node
        ("accelerate", [], 1),
        ("deepspeed", ["--gres", "gpu:2"], 2),  # its own srun -n 4, laid out 2 per node
    ],
    ids=["torchrun-cpu", "srun-a100:1", "torchrun-gres-gpu:2", "accelerate", "deepspeed-gpu:2"],
)
@pytest.mark.slurm
def test_each_launcher_trains_on_both_nodes(
    launcher, gpus, ranks_per_node, cluster, tiny, submit_env, tmp_path
):
    run_dir = tmp_path / "run"
    extra = ["train.deepspeed=configs/deepspeed/zero2.json"] if launcher == "deepspeed" else []
    submitted = launch(
        submit_env,
        "--nodes",
        "2",
        "--launcher",
        launcher,
        *gpus,
        *train_args(tiny, run_dir, *extra),
    )
    job = job_id(submitted)
    log = run_dir / f"slurm-{job}.out"
    assert f"log:    {log}" in submitted.stdout
    info = finished(cluster, job, log)
    assert info["Restarts"] == "0"
    text = log.read_text()
    by_node = ranks_by_node(text)
    assert set(by_node) == set(NODES), text[-3000:]
    assert sorted(r for ranks in by_node.values() for r in ranks) == list(range(2 * ranks_per_node))
    assert all(len(ranks) == ranks_per_node for ranks in by_node.values())
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1
    # the deepspeed template's hostfile is gone with the job
    assert not (Path(submit_env.get("TMPDIR", "/tmp")) / f"dtrain-hostfile-{job}").exists()
    assert "FutureWarning" not in text, text[-3000:]  # the understood ones are silenced
    if gpus:  # SLURM granted the (fake) GPUs: the request reached the job as asked
        assert (
            cluster.job(job)["TresPerNode"]
            == {
                "a100:1": "gres:gpu:a100:1",
                "gpu:2": "gres:gpu:2",
            }[gpus[1]]
        )


@pytest.mark.slurm
def test_a_shipped_template_runs_with_plain_sbatch(cluster, tiny, submit_env, tmp_path):
    """`sbatch launchers/slurm_torchrun.sbatch ARGS` from the project folder, no hand edits:
    the counts overridden on sbatch's command line as usual (a typed GPU request), the venv
    found beside the script's submit folder, the log in the checkout's git-ignored logs/ (not
    in the checkout itself)."""
    run_dir = tmp_path / "run"
    submitted = cluster.run(
        "sbatch",
        "--parsable",
        "--cpus-per-task=1",
        "--gpus-per-node=a100:1",
        "launchers/slurm_torchrun.sbatch",
        *train_args(tiny, run_dir),
        env=submit_env,
        cwd=ROOT,
    )
    job = submitted.stdout.strip()
    log = ROOT / "logs" / f"dtrain-{job}.out"
    try:
        finished(cluster, job, log)
        assert set(ranks_by_node(log.read_text())) == set(NODES)
        assert not (ROOT / f"dtrain-{job}.out").exists()
        ignored = subprocess.run(["git", "check-ignore", "-q", str(log)], cwd=ROOT)
        assert ignored.returncode == 0, "logs/ is not ignored by git"
    finally:
        log.unlink(missing_ok=True)
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cpus-per-task", "64"], "64 CPUs: the nodes of partition debug have at most 2"),
        (["--nodes", "3"], "partition debug has 2 node"),
        (["--gpus-per-node", "h100:1"], "1 h100 GPUs per node"),
        (["--partition", "gpu"], "no partition 'gpu'; its partitions: debug"),
        # 2 nodes x 8 GPUs: 16 ranks for the 12 train shards
        (["--nodes", "2", "--gres", "gpu:8"], "cannot feed 16 ranks x 1 workers = 16"),
    ],
)
@pytest.mark.slurm
def test_a_request_that_cannot_fit_is_refused_before_submitting(
    args, message, cluster, tiny, submit_env, tmp_path
):
    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    result = launch(submit_env, *args, *train_args(tiny, tmp_path / "run"), check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before
    assert not (tmp_path / "run").exists()


def ranks_catch_usr1(job: str, ranks: int) -> bool:
    """Whether the job's `python -m dtrain` processes (not its supervisor) all handle USR1."""
    pids = []
    for pid in processes_with_env(f"SLURM_JOB_ID={job}"):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone
        if args[1:3] == [b"-m", b"dtrain"]:
            pids.append(pid)
    return len(pids) == ranks and all(catches(pid, signal.SIGUSR1) for pid in pids)


@pytest.mark.slurm
def test_a_warning_to_the_ranks_themselves_is_kept(cluster, tiny, submit_env, tmp_path):
    """USR1 to the job steps (`--signal=USR1@...` without B:, or scancel): under srun the
    ranks get it directly. Sent as soon as their handlers exist, while they still import
    torch: each checkpoints at its first log step and the job requeues. (Before the handler,
    in the interpreter's own start, the default action would still end the rank: the
    templates send the warning to the batch shell instead.)"""
    run_dir = tmp_path / "run"
    args = train_args(tiny, run_dir, "train.log_every=1")
    job = job_id(launch(submit_env, "--nodes", "2", "--launcher", "srun", *args))
    log = run_dir / f"slurm-{job}.out"

    wait_for(lambda: ranks_catch_usr1(job, 2), 120, "ranks with their handlers")
    cluster.run("scancel", "--signal=USR1", job)
    info = finished(cluster, job, log)
    text = log.read_text()
    assert info["Restarts"] == "1", text[-3000:]
    assert "User defined signal" not in text
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1


@pytest.mark.slurm
def test_a_term_through_torchrun_requeues_instead_of_failing(cluster, tiny, submit_env, tmp_path):
    """TERM to the job steps (a preemption's, or `scancel`): torchrun forwards it to its ranks,
    which checkpoint, and then exits 1 itself; the ranks' acknowledgement makes that a requeue,
    not a job that ends FAILED 143."""
    run_dir = tmp_path / "run"
    args = train_args(tiny, run_dir, "data.batch_size=4", "train.epochs=3", "train.log_every=2")
    job = job_id(launch(submit_env, "--nodes", "2", "--launcher", "torchrun", *args))
    log = run_dir / f"slurm-{job}.out"
    wait_for(lambda: logged_a_step(run_dir), 180, "logged step")
    cluster.run("scancel", "--signal=TERM", job)
    info = finished(cluster, job, log)
    text = log.read_text()
    assert info["Restarts"] == "1", text[-3000:]
    # torchrun's own failure (1, or srun's 143 once it ends the other node's torchrun)
    assert re.search(r"the ranks stopped at a checkpoint \(exit [1-9]\d*\)", text), text[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 3


@pytest.mark.slurm
def test_a_cancelled_job_stays_cancelled(cluster, tiny, submit_env, tmp_path):
    """`scancel` sends TERM to the ranks as well, which may checkpoint and acknowledge a stop:
    the supervisor must not requeue a job that is being cancelled."""
    run_dir = tmp_path / "run"
    args = train_args(tiny, run_dir, "data.batch_size=4", "train.epochs=3", "train.log_every=2")
    job = job_id(launch(submit_env, "--nodes", "2", "--launcher", "srun", *args))
    wait_for(lambda: logged_a_step(run_dir), 180, "logged step")
    cluster.run("scancel", job)
    cluster.wait_job(job, ENDED, 120)
    time.sleep(5)  # a requeue would show by now
    info = cluster.job(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slurm
def test_the_ray_template_runs_a_search_on_a_head_and_a_worker_and_leaves_no_ray_behind(
    cluster, tiny, submit_env, tmp_path
):
    search = tmp_path / "s.yaml"
    search.write_text(
        yaml.safe_dump(
            {
                "space": {"method.temperature": {"choice": [0.2, 0.5]}},
                "search": {"algorithm": "grid", "scheduler": "none"},
            }
        )
    )
    overrides = [o for o in train_args(tiny, tmp_path / "unused") if "run_dir" not in o]
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
    assert "Ray cluster of 2 node(s) up" in text
    trials = (folder / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and all(",done," in line for line in trials[1:]), trials
    # it leaves the nodes as it found them: no Ray process, no address file that a later
    # `ray.init()` on the node would follow to the gone head
    assert left == [] and address_files == [], text[-3000:]

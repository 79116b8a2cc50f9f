"""kill -9 of a training process at points spread over a run, once half-way through writing a
checkpoint, and once under DeepSpeed ZeRO-2: each time `--resume` continues from the last whole
checkpoint and the run ends with the weights of a run never interrupted (CPU, deterministic)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROCS, REPO, small_overrides, stripes_dataset

ROOT = REPO
HURT = PROCS / "hurt.py"
STEPS_PER_EPOCH = 14  # 224 train samples, batches of 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("kill"), 160, shard_size=16)


@pytest.fixture(scope="module")
def env(cpu_env) -> dict:
    return cpu_env


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    # mid-epoch checkpoints every 4 steps, looked at on every second step
    return small_overrides(
        data, run_dir, 16, "train.log_every=2", "train.checkpoint_every_steps=4", *extra
    )


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def crash(env: dict, point: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    result = run([sys.executable, str(HURT), point, str(step), "--", *args], env)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def resumed_from(run_dir: Path) -> int:
    return torch.load(run_dir / "last.pt", weights_only=True)["state"]["step"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = (torch.load(p / "last.pt", weights_only=True) for p in (a, b))
    assert first["state"]["step"] == second["state"]["step"]
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name


@pytest.mark.multiproc
def test_killed_at_six_points_resumes_each_time_to_the_uninterrupted_weights(tiny, tmp_path, env):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run([sys.executable, "-m", "dtrain", "train", *train_args(tiny, straight)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    args = ["--resume", *train_args(tiny, killed)]
    # (point, after global step, the checkpoint the next resume must start from)
    points = [
        ("step", 3, None),  # before any checkpoint: only config.yaml is there
        ("forward", 5, 4),  # mid-forward of step 6, after the mid-epoch checkpoint at step 4
        ("eval", STEPS_PER_EPOCH, 12),  # the epoch boundary: validating epoch 1
        ("save", STEPS_PER_EPOCH, 12),  # half-way through writing epoch 1's checkpoint
        ("step", 21, 18),  # right after a step, mid-epoch 2
        ("test", 2 * STEPS_PER_EPOCH, 28),  # the final test, after the last checkpoint
    ]
    for point, step, checkpoint in points:
        crash(env, point, step, args if checkpoint is not None or point != "step" else args[1:])
        if checkpoint is None:
            assert (killed / "config.yaml").exists() and not (killed / "last.pt").exists()
        else:
            assert resumed_from(killed) == checkpoint, point
        if point == "save":  # the half-written file is there, beside an intact last.pt
            assert list(killed.glob("*.last.pt.pending*")), point
    finished = run([sys.executable, "-m", "dtrain", "train", *args], env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not list(killed.glob("*.pending*"))
    assert_same_weights(straight, killed)
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if r["kind"] == "step"]
    assert steps == list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))  # each step once, in order
    assert [r["epoch"] for r in logged if r["kind"] == "epoch"] == [1, 2]
    assert json.loads((killed / "summary.json").read_text())["epochs"] == 2


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


@pytest.mark.multiproc
def test_killed_under_deepspeed_zero2_resumes_to_the_uninterrupted_weights(tiny, tmp_path, env):
    """Two ranks, 7 steps each per epoch; both killed right after step 6 (a node lost), the
    mid-epoch checkpoint at step 4 and its DeepSpeed shards behind them."""
    zero2 = f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run(torchrun(2, "-m", "dtrain", "train", *train_args(tiny, straight, zero2)), env)
    assert done.returncode == 0 and "2 process(es)" in done.stdout, done.stderr[-3000:]
    args = ["--resume", *train_args(tiny, killed, zero2)]
    died = run(torchrun(2, str(HURT), "step", "6", "--", *args[1:]), env)
    assert died.returncode != 0 and "Signal 9 (SIGKILL)" in died.stderr, died.stderr[-3000:]
    assert resumed_from(killed) == 4
    assert (killed / "deepspeed" / "step4").is_dir()
    finished = run(torchrun(2, "-m", "dtrain", "train", *args), env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_weights(straight, killed)
    last = torch.load(killed / "last.pt", weights_only=True)
    tags = [p.name for p in (killed / "deepspeed").iterdir() if p.is_dir()]
    assert tags == [last["deepspeed_tag"]]  # older shards removed once last.pt moved on

"""The disk fills up while a checkpoint is written (a small tmpfs of its own): a clear error, the
previous `last.pt` and `best.pt` intact and loadable, and the run resumable once there is room."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PROCS, REPO, small_overrides, stripes_dataset, write_stripes

ROOT = REPO
HURT = PROCS / "hurt.py"


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (room for two checkpoints, each with its weight average); skipped, with
    the reason, where this machine cannot mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.mark.multiproc
def test_a_full_disk_fails_the_save_clearly_and_keeps_both_checkpoints(tmp_path, small_disk):
    data = stripes_dataset(tmp_path, 160, shard_size=16)
    run_dir = small_disk / "run"
    args = small_overrides(data, run_dir, 16, "train.log_every=2", "train.checkpoint_every_steps=4")
    # the disk fills right after epoch 1's checkpoint (step 14, last.pt = best.pt);
    # the mid-epoch checkpoint at step 18 finds no room
    full = subprocess.run(
        [sys.executable, str(HURT), "fill", "14", "--", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    error = full.stderr.strip().splitlines()
    assert len(error) == 1 and "no space left on the device of" in error[0], full.stderr[-3000:]
    assert str(run_dir) in error[0] and "--resume" in error[0]
    for name in ("last.pt", "best.pt"):
        assert torch.load(run_dir / name, weights_only=True)["state"]["step"] == 14, name
    assert not list(run_dir.glob("*.pending*"))  # no half-written file left to take space
    (small_disk / "filler").unlink()
    resumed = subprocess.run(
        [sys.executable, "-m", "dtrain", "train", "--resume", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run_dir / "last.pt", weights_only=True)["state"]["epoch"] == 2


def test_prepare_on_a_full_disk_says_so_in_one_line(tmp_path, small_disk):
    images = write_stripes(tmp_path / "img", 40)
    with open(small_disk / "filler", "wb") as handle:  # all but 64 KiB of the 32 MiB
        handle.write(b"\0" * (shutil.disk_usage(small_disk).free - 2**16))
    full = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "prepare",
            str(images),
            "--out",
            str(small_disk / "ds"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    error = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(error) == 1, full.stderr[-3000:]
    assert "No space left on device" in error[0] and "free space, then rerun" in error[0]
    assert not (small_disk / "ds" / "dataset.json").exists()

"""A skipped optimiser step leaves the run as it was before it: weights, weight average and
batch-norm statistics, on both engines, with gradient accumulation, in two processes
(the training: tests/procs/skip_steps.py, under torchrun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, PROCS, REPO, small_overrides, stripes_dataset

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """128 stripe images in shards of 8, so that every split feeds 2 ranks."""
    return stripes_dataset(tmp_path_factory.mktemp("skips"), 64, shard_size=8)


@pytest.mark.parametrize(
    "deepspeed, kind",
    [("", "loss"), ("zero2.json", "loss"), ("zero2.json", "input")],
    ids=["accelerate-loss", "deepspeed-loss", "deepspeed-activation"],
)
@pytest.mark.multiproc
def test_a_nonfinite_micro_step_skips_the_whole_step(deepspeed, kind, tiny, tmp_path, cpu_env):
    """Step 2's first micro-step (call 3, rank 0 only) is poisoned; its second is fine."""
    run_dir, out = tmp_path / "run", tmp_path / "states.pt"
    extra = [f"train.deepspeed={CONFIGS / 'deepspeed' / deepspeed}"]
    overrides = small_overrides(
        tiny,
        run_dir,
        8,
        "method.name=ce",
        "train.grad_accum_steps=2",
        "train.stop_after_steps=4",
        *(extra if deepspeed else []),
    )
    command = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        str(PROCS / "skip_steps.py"),
    ]
    result = subprocess.run(
        [*command, str(out), kind, "3", *overrides],
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    states = torch.load(out, weights_only=True)
    assert [s["step"] for s in states] == [1, 2, 3, 4]
    first, skipped, taken = states[0], states[1], states[2]
    assert first["ema"], "the run keeps a weight average"
    for part in ("net", "ema"):
        for name, tensor in first[part].items():
            assert torch.equal(skipped[part][name], tensor), (part, name)
    assert any(not torch.equal(taken["net"][k], v) for k, v in skipped["net"].items())
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["state"]["skipped_steps"] == 1
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in saved[part].values() if v.is_floating_point())

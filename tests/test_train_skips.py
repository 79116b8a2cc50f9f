"""A skipped optimiser step leaves the run as it was before it: weights, weight average and
batch-norm statistics, on both engines, with gradient accumulation, in two processes.

Run by torchrun, this file is also the training: rank 0 poisons the given (1-based) calls of
the CE step, either its loss (NaN) or one image of its input (a NaN activation that reaches the
batch-norm statistics), and writes the network and its average after every optimiser step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_overrides, stripes_dataset

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def poison(kind: str, calls: set[int]) -> None:
    """Fault injection into the CE step of this process."""
    from dtrain.methods import steps

    original, count = steps.ce_step, [0]

    def step(model, batch, ctx):
        count[0] += 1
        if count[0] in calls and kind == "input":
            batch = {**batch, "view1": batch["view1"].clone()}
            batch["view1"][0] = float("nan")
        out = original(model, batch, ctx)
        if count[0] in calls and kind == "loss":
            out.loss = out.loss * float("nan")
        return out

    steps.ce_step = step


def train(out: str, kind: str, calls: str, overrides: list[str]) -> None:
    from dtrain.config import load_config
    from dtrain.train.resolve import resolve
    from dtrain.train.trainer import Trainer

    if os.environ.get("RANK", "0") == "0":
        poison(kind, {int(c) for c in calls.split(",")})
    states = []

    def record(info) -> None:
        ema = trainer.ema.net.state_dict() if trainer.ema is not None else {}
        states.append(
            {
                "step": info.step,
                "net": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                "ema": {k: v.clone() for k, v in ema.items()},
            }
        )

    trainer = Trainer(resolve(load_config(None, overrides)), on_step=record)
    trainer.fit()
    if os.environ.get("RANK", "0") == "0":
        torch.save(states, out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """128 stripe images in shards of 8, so that every split feeds 2 ranks."""
    return stripes_dataset(tmp_path_factory.mktemp("skips"), 64, shard_size=8)


@pytest.mark.parametrize(
    "deepspeed, kind",
    [("", "loss"), ("zero2.json", "loss"), ("zero2.json", "input")],
    ids=["accelerate-loss", "deepspeed-loss", "deepspeed-activation"],
)
def test_a_nonfinite_micro_step_skips_the_whole_step(deepspeed, kind, tiny, tmp_path, cpu_env):
    """Step 2's first micro-step (call 3, rank 0 only) is poisoned; its second is fine."""
    run_dir, out = tmp_path / "run", tmp_path / "states.pt"
    extra = [f"train.deepspeed={HERE.parent / 'configs' / 'deepspeed' / deepspeed}"]
    overrides = small_overrides(
        tiny,
        run_dir,
        8,
        "method.name=ce",
        "train.grad_accum_steps=2",
        "train.stop_after_steps=4",
        *(extra if deepspeed else []),
    )
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", __file__]
    result = subprocess.run(
        [*command, str(out), kind, "3", *overrides],
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=HERE.parent,
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


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])

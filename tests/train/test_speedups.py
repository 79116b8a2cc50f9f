"""train.compile and train.channels_last: the same training, the same checkpoints. They change
how the step runs, never what it computes or what a run saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_overrides, stripes_dataset

from dtrain.config import load_config, operational_keys
from dtrain.errors import ConfigError
from dtrain.methods.model import build_model
from dtrain.train.checkpoint import load_checkpoint
from dtrain.train.resolve import resolve
from dtrain.train.trainer import Trainer


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("stripes"), 48, shard_size=16)


@pytest.fixture(scope="module")
def eager(stripes, tmp_path_factory) -> list[float]:
    """The step losses without either speed-up: what both must reproduce."""
    return _train(stripes, tmp_path_factory.mktemp("eager") / "run", "train.seed=3")[1]


def _train(
    data: Path, run: Path, *extra: str, layouts: list[bool] | None = None
) -> tuple[dict, list[float]]:
    """The summary and the step losses; with `layouts`, whether each convolution's input and
    weight were channels-last (NHWC), from the second step on."""
    losses = []
    config = load_config(
        None, small_overrides(data, run, 16, "train.epochs=1", "train.log_every=1", *extra)
    )

    def on_step(info) -> None:
        losses.append(info.metrics["loss"])
        if layouts is not None and info.step == 1:
            for conv in (m for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d)):
                conv.register_forward_pre_hook(lambda m, args: layouts.append(nhwc(m, args[0])))

    trainer = Trainer(resolve(config), on_step=on_step)
    return trainer.fit(), losses


def nhwc(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    channels_last = torch.channels_last
    return x.is_contiguous(memory_format=channels_last) and conv.weight.is_contiguous(
        memory_format=channels_last
    )


# aot_eager: torch.compile's capture and AOT autograd as with inductor, without its code
# generation (minutes on 2 cores); inductor itself runs in benchmarks/step_breakdown.py
@pytest.mark.parametrize(
    "speedup",
    ["train.channels_last=true", "train.compile=aot_eager"],
    ids=["channels_last", "compile"],
)
def test_a_speedup_trains_the_same_and_saves_plain_weights(stripes, eager, tmp_path, speedup):
    from torch._dynamo.utils import counters

    counters.clear()
    layouts: list[bool] = []
    watch = layouts if "channels_last" in speedup else None  # hooks would change the graph
    summary, fast = _train(stripes, tmp_path / "fast", "train.seed=3", speedup, layouts=watch)
    if "compile" in speedup:  # dynamo captured the step and AOT autograd compiled it
        assert counters["stats"]["unique_graphs"] > 0, dict(counters)
        assert counters["aot_autograd"]["total"] > 0, dict(counters)
    else:  # every convolution ran on NHWC inputs and weights (the hooks are eager only)
        assert layouts and all(layouts), layouts
    assert len(fast) == len(eager) > 3
    # the first loss is the same network on the same batch; after a few updates, rounding
    # differences (other convolution kernels, fused ops) grow, the training does not change
    assert fast[:2] == pytest.approx(eager[:2], rel=1e-3)
    assert fast == pytest.approx(eager, rel=0.1)
    ckpt = load_checkpoint(tmp_path / "fast" / "best.pt")
    config = load_config(tmp_path / "fast" / "config.yaml")
    net = build_model(config.model, config.method.name, 2, 1)
    net.load_state_dict(ckpt["model"])  # strict: no `_orig_mod.` prefixes, nothing missing
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert summary["test_last"]["samples"] > 0


def test_both_may_change_when_a_run_resumes():
    assert {"train.compile", "train.channels_last"} <= set(operational_keys())


def test_an_unknown_compile_backend_is_refused_by_name():
    with pytest.raises(ConfigError, match="train.compile='indcutor'.*inductor"):
        load_config(None, ["train.compile=indcutor"]).validate()


def test_channels_last_under_deepspeed_is_refused():
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(
            None, ["train.channels_last=true", "train.deepspeed=configs/deepspeed/zero2.json"]
        ).validate()

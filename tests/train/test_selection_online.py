"""The trainer's own online decision (which epoch's weights it writes to `best.pt`), on a real
run whose val accuracies are replaced by hand-made ones: the rule is applied where it matters,
at the end of each epoch, not only in the replay the report prints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_overrides, stripes_dataset

from dtrain.config import load_config
from dtrain.train.resolve import resolve
from dtrain.train.trainer import Trainer

# the history: one good first epoch, then a slow climb to a better plateau
RAW = [0.70, 0.60, 0.62, 0.64, 0.66, 0.68, 0.69, 0.69, 0.69, 0.69]
EMA = [0.50, 0.60, 0.66, 0.66, 0.64, 0.63, 0.62, 0.61, 0.60, 0.60]


class ScriptedVal(Trainer):
    """A trainer whose val accuracy (raw and average) at epoch e is RAW[e-1] / EMA[e-1]."""

    def evaluate(self, loader, net=None):
        metrics = super().evaluate(loader, net)
        if loader is self.val_loader:
            script = RAW if net is None else EMA
            metrics["accuracy"] = script[self.state.epoch]
        return metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("tiny"), 64, shard_size=16)


@pytest.mark.parametrize(
    ("rule", "epoch"),
    [
        # full 5-epoch windows only: the means end at .644 (epoch 5) and rise to .688
        # (epoch 10); a partial window would let epoch 1 (.70 alone) win for good
        ("noisy_val_smoothed", 10),
        ("ema_noisy_val", 4),  # .66 at epochs 3 and 4: the newer one on a tie
        ("noisy_val", 1),
    ],
)
@pytest.mark.slow
def test_the_trainer_writes_the_epoch_its_rule_picks_to_best_pt(tiny, tmp_path, rule, epoch):
    overrides = small_overrides(tiny, tmp_path / rule, 16, f"train.select={rule}")
    config = load_config(None, [*overrides, "train.epochs=10", "train.select_window=5"])
    summary = ScriptedVal(resolve(config)).fit()
    best = torch.load(tmp_path / rule / "best.pt", weights_only=True)
    assert best["state"]["epoch"] == epoch
    assert summary["selection"]["rule"] == rule and summary["best_epoch"] == epoch


def test_a_smoothed_rule_in_a_run_shorter_than_its_window_follows_the_last_epoch(tiny, tmp_path):
    overrides = small_overrides(tiny, tmp_path / "short", 16, "train.select=noisy_val_smoothed")
    summary = ScriptedVal(resolve(load_config(None, [*overrides, "train.select_window=5"]))).fit()
    assert summary["selection"]["rule"] == "last"
    assert summary["selection"]["asked"] == "noisy_val_smoothed"
    assert summary["best_epoch"] == 2

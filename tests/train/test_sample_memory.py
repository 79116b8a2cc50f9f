"""The per-sample memory of ELR and DivideMix: rows change only at an epoch's end, from what the
steps handed back; padding and skipped steps hand back nothing; a checkpoint holds it whole, so a
stopped and resumed run trains on the same memory as an uninterrupted one."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import small_overrides, stripes_dataset

from dtrain.config import load_config
from dtrain.methods.memory import MemoryRule
from dtrain.train import train
from dtrain.train.sample_memory import SampleMemory


def averaging_memory() -> SampleMemory:
    """row <- (row + mean hand-back) / 2, from 1.0: easy to follow by hand."""
    return SampleMemory(MemoryRule(initial=(1.0, 1.0), end_epoch=lambda old, new: (old + new) / 2))


def test_rows_change_only_at_the_epoch_end_and_only_for_samples_seen():
    memory = averaging_memory()
    assert memory.lookup(["a", "b"], torch.device("cpu")).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    memory.add(
        ["a", "b", "pad"],
        torch.tensor([True, True, False]),
        torch.tensor(
            [[3.0, 5.0], [float("nan"), 0.0], [9.0, 9.0]]  # b: a skipped step's non-finite row
        ),
    )
    memory.merge()
    assert memory.lookup(["a"], torch.device("cpu")).tolist() == [[1.0, 1.0]]  # not yet
    memory.end_epoch()
    assert memory.lookup(["a", "b", "pad", "c"], torch.device("cpu")).tolist() == [
        [2.0, 3.0],  # (1 + 3) / 2, (1 + 5) / 2
        [1.0, 1.0],  # its step was skipped: nothing learned about it
        [1.0, 1.0],  # padding
        [1.0, 1.0],  # never seen
    ]
    memory.add(["a"], torch.tensor([True]), torch.tensor([[4.0, 1.0]]))
    memory.end_epoch()
    assert memory.lookup(["a"], torch.device("cpu")).tolist() == [[3.0, 2.0]]


def test_a_saved_memory_loads_with_weights_only_and_keeps_the_epochs_hand_backs(tmp_path):
    memory = averaging_memory()
    memory.add(["a", "b"], torch.tensor([True, True]), torch.tensor([[3.0, 5.0], [7.0, 9.0]]))
    memory.end_epoch()
    memory.add(["b"], torch.tensor([True]), torch.tensor([[1.0, 1.0]]))  # mid-epoch
    memory.merge()
    torch.save({"memory": memory.state_dict()}, tmp_path / "m.pt")
    again = averaging_memory()
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["memory"])
    again.end_epoch()
    memory.end_epoch()
    keys = ["a", "b"]
    assert again.lookup(keys, torch.device("cpu")).tolist() == [[2.0, 3.0], [2.5, 3.0]]
    assert memory.lookup(keys, torch.device("cpu")).tolist() == [[2.0, 3.0], [2.5, 3.0]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("memory"), 160, shard_size=16)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, refine", [("elr", ""), ("dividemix", ""), ("iam_elr", "method.elr_refine_from=1")]
)
def test_a_stopped_and_resumed_run_has_the_uninterrupted_memory_and_weights(
    tiny, tmp_path, method, refine
):
    """Stopped in epoch 2 (14 steps an epoch), after DivideMix's division of epoch 1 began to
    steer it, then resumed: the same memory rows and the same weights as a straight run."""
    overrides = (f"method.name={method}", "method.warmup_epochs=1", "train.epochs=3")
    overrides += (refine,) if refine else ()

    def config(run_dir: Path, *extra: str):
        return load_config(None, small_overrides(tiny, run_dir, 16, *overrides, *extra))

    straight = tmp_path / "straight"
    train(config(straight))
    interrupted = tmp_path / "interrupted"
    stop = threading.Event()
    result = train(
        config(interrupted, "train.log_every=5"),
        on_step=lambda info: info.step == 18 and stop.set(),
        stop=stop,
    )
    assert result == {"stopped": True, "epoch": 1, "batch": 6}
    train(config(interrupted), resume=True)

    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (straight, interrupted))
    assert a["memory"]["keys"] == b["memory"]["keys"] and len(a["memory"]["keys"]) == 224
    assert torch.equal(a["memory"]["rows"], b["memory"]["rows"])
    assert a["memory"]["seen_keys"] == []  # folded in at the last epoch's end
    rows = a["memory"]["rows"]
    if method == "dividemix":  # clean probabilities, some below 1 (a posterior may round to 1)
        assert ((rows[:, :2] >= 0) & (rows[:, :2] <= 1)).all() and (rows[:, :2] < 1).any()
    else:  # every sample's ELR target moved off its start, 0
        assert (rows[:, :2] != 0).any(1).all()
    if refine:  # the per-class division ran: some labels distrusted
        assert (rows[:, 2] < 0.5).any() and (rows[:, 2] > 0.5).any()
    assert set(rows[:, -1].tolist()) == {0.0, 1.0}  # every row holds its sample's label
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.slow
def test_dividemix_divides_out_the_wrong_labels_of_an_easy_set(tiny, tmp_path):
    """On stripes with 20% wrong labels, after a 2-epoch warm-up, each peer's division keeps
    about the clean 80% as labelled and the model stays right on the clean val labels."""
    run = tmp_path / "run"
    overrides = ("method.name=dividemix", "method.warmup_epochs=2", "train.epochs=6")
    train(load_config(None, small_overrides(tiny, run, 16, *overrides)))
    epochs = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in line
    ]
    assert all(e["train_labelled"] == pytest.approx(0.8, abs=0.06) for e in epochs[3:])
    assert epochs[-1]["val_clean_accuracy"] >= 0.95

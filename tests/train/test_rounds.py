"""The weight average and model selection in a real run, and label clean-up rounds end to end:
corrections written for audit, the next round trained on them, resume without repeating a
finished round, and the refusals."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_overrides, stripes_dataset
from safetensors.torch import load_file

from dtrain.config import load_config
from dtrain.errors import ConfigError, RunFolderError
from dtrain.train import train
from dtrain.train.resolve import resolve
from dtrain.train.trainer import Trainer
from dtrain.tune.settings import _one_round


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("tiny"), 160, shard_size=16)


def config(data: Path, run_dir: Path, *overrides: str):
    return load_config(None, small_overrides(data, run_dir, 16, *overrides))


@pytest.mark.slow
def test_the_weight_average_is_evaluated_each_epoch_and_can_be_the_selected_model(tiny, tmp_path):
    run = tmp_path / "ema"
    summary = train(config(tiny, run, "train.select=ema_last"))
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert {"val_ema_accuracy", "val_ema_clean_accuracy"} <= set(epochs[0])
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["selected_weights"] == "ema" and best["state"]["epoch"] == 2
    exported = load_file(run / "model.safetensors")
    name = next(k for k in best["ema"] if k.endswith("weight"))
    assert torch.equal(exported[name], best["ema"][name])
    assert not torch.equal(best["ema"][name], best["model"][name])  # an average, not a copy
    assert summary["test_best"] == summary["test_ema_last"] != summary["test_last"]
    assert summary["selection"]["rule"] == "ema_last" and summary["best_epoch"] == 2
    # the decay the average reached: the plain mean of all steps so far (horizon 3 epochs)
    steps = torch.load(run / "last.pt", weights_only=True)["state"]["step"]
    assert summary["selection"]["ema_decay"] == epochs[-1]["ema_decay"] == (steps - 1) / steps
    # noisy_val_smoothed needs a full window (5 epochs): a 2-epoch run has none to offer
    assert {c["rule"] for c in summary["selection"]["candidates"]} == {
        "last",
        "ema_last",
        "noisy_val",
        "ema_noisy_val",
    }

    raw = tmp_path / "raw"
    summary = train(config(tiny, raw, "train.select=last", "train.ema_epochs=0"))
    best = torch.load(raw / "best.pt", weights_only=True)
    assert best["selected_weights"] == "raw" and best["ema"] is None
    assert summary["test_best"] == summary["test_last"] and summary["test_ema_last"] is None
    assert summary["selection"]["rule"] == "last"


def test_the_weight_average_resumes_exactly(tiny, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(config(tiny, straight, "train.epochs=1"))
    stop = threading.Event()
    stopped = train(
        config(tiny, interrupted, "train.epochs=1", "train.log_every=2"),
        on_step=lambda info: info.step == 3 and stop.set(),
        stop=stop,
    )
    assert stopped["stopped"]
    train(config(tiny, interrupted, "train.epochs=1"), resume=True)
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (straight, interrupted))
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), name


def test_a_round_corrects_labels_and_the_next_round_trains_on_them(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(config(tiny, run, "train.refine_rounds=1"))
    corrections = pq.read_table(run / "rounds" / "0" / "corrections.parquet").to_pylist()
    assert corrections, "a 2-epoch model on 20% noise disagrees with some labels"
    assert all(c["old"] != c["new"] for c in corrections)
    assert [c["rank"] for c in corrections] == sorted(c["rank"] for c in corrections)
    first = {r["key"]: r for r in pq.read_table(run / "rounds/0/label_scores.parquet").to_pylist()}
    final = {r["key"]: r for r in pq.read_table(run / "label_scores.parquet").to_pylist()}
    for c in corrections:  # round 1 trained on the new labels, and knows which are wrong now
        assert first[c["key"]]["noisy_label"] == c["old"]
        assert final[c["key"]]["noisy_label"] == c["new"]
        assert final[c["key"]]["is_noisy"] == (not c["was_wrong"])  # two classes
    fixed = sum(c["was_wrong"] for c in corrections)
    broken = len(corrections) - fixed
    wrong_before = sum(r["is_noisy"] for r in first.values())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["corrections"] == len(corrections)
    assert rounds[0]["label_error"] == wrong_before / len(first)
    assert rounds[1]["label_error"] == (wrong_before - fixed + broken) / len(final)
    assert json.loads((run / "rounds.json").read_text()) == rounds
    assert json.loads((run / "summary.json").read_text())["rounds"] == rounds
    assert (run / "model.safetensors").is_file() and (run / "best.pt").is_file()


def test_rounds_resume_without_repeating_a_finished_round(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = config(tiny, run, "train.refine_rounds=1", "train.log_every=2")
    with pytest.raises(RunFolderError, match="holds no run to resume"):
        train(cfg, resume=True)
    stop_file, done = tmp_path / "stop", run / "rounds" / "0" / "corrections.parquet"

    def stop_in_round_one():  # what a SLURM warning does, once round 0 has finished
        while not done.exists():
            time.sleep(0.01)
        stop_file.touch()

    threading.Thread(target=stop_in_round_one, daemon=True).start()
    assert train(cfg, stop_file=stop_file)["stopped"]
    before = {p.name: p.stat().st_mtime_ns for p in done.parent.iterdir() if p.is_file()}
    assert (run / "last.pt").is_file() and not (run / "summary.json").exists()
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(cfg)
    stop_file.unlink()
    summary = train(cfg, resume=True)
    after = {p.name: p.stat().st_mtime_ns for p in done.parent.iterdir() if p.is_file()}
    assert after == before  # round 0 was not run again
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    changed = config(tiny, run, "train.refine_rounds=1", "train.log_every=2", "optim.momentum=0.8")
    with pytest.raises(
        RunFolderError,
        match=r"finished round\) was trained with a different config \(optim.momentum\)",
    ):
        train(changed, resume=True)
    # a key a resumed run may change, but one that changes the weights: round 0 is not reused
    faster = config(tiny, run, "train.refine_rounds=1", "train.log_every=2", "optim.lr=0.1")
    with pytest.raises(RunFolderError, match=r"different config \(optim.lr\)"):
        train(faster, resume=True)


def test_a_warm_round_starts_from_the_previous_rounds_weights(tiny, tmp_path):
    first = tmp_path / "first"
    train(config(tiny, first, "train.stop_after_steps=1"))
    trainer = Trainer(resolve(config(tiny, tmp_path / "next")), init_weights=first / "last.pt")
    trainer.build()
    saved = torch.load(first / "last.pt", weights_only=True)["model"]
    for name, tensor in trainer.net.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert all(torch.equal(t, saved[n]) for n, t in trainer.ema.net.state_dict().items())
    trainer.engine.close()


def test_a_search_trains_one_round():
    quiet = load_config(None, [])
    _one_round(quiet)
    assert quiet.train.refine_rounds == 0
    with pytest.raises(ConfigError, match="train.refine_rounds"):
        _one_round(load_config(None, ["train.refine_rounds=2"]))


def test_a_fold_model_never_sees_the_labels_it_hides(tiny, tmp_path):
    """Whatever labels fold 0 holds, a model that hides them trains to the same weights; it
    scores exactly those samples, against their labels."""

    def fold_run(name: str, relabel: dict[str, int] | None) -> Trainer:
        cfg = config(tiny, tmp_path / name, "train.refine_rounds=1", "train.refine_folds=2")
        trainer = Trainer(resolve(cfg), relabel=relabel, hidden_fold=(0, 2))
        trainer.fit()
        return trainer

    plain = fold_run("plain", None)
    rows = plain.scores.table.to_pylist()
    all_keys = {
        r["key"]
        for r in pq.read_table(tiny / "manifest.parquet").to_pylist()
        if r["split"] == "train"
    }
    assert 0 < len(rows) < len(all_keys)  # fold 0 alone, scored
    flipped = fold_run("flipped", {r["key"]: 1 - r["label"] for r in rows})
    for name, tensor in plain.net.state_dict().items():
        assert torch.equal(tensor, flipped.net.state_dict()[name]), name
    again = {r["key"]: r["label"] for r in flipped.scores.table.to_pylist()}
    assert again == {r["key"]: 1 - r["label"] for r in rows}  # scored against the labels it hid


@pytest.mark.slow
def test_a_cross_fitted_round_judges_each_label_by_the_model_that_hid_it(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(config(tiny, run, "train.refine_rounds=1", "train.refine_folds=2"))
    folds = [
        {
            r["key"]: r
            for r in pq.read_table(run / f"rounds/0/fold{k}/label_scores.parquet").to_pylist()
        }
        for k in range(2)
    ]
    final = pq.read_table(run / "label_scores.parquet").to_pylist()
    assert folds[0] and folds[1] and not folds[0].keys() & folds[1].keys()
    assert folds[0].keys() | folds[1].keys() == {r["key"] for r in final}
    groups = {}  # copies of one scan share a fold
    for r in pq.read_table(tiny / "manifest.parquet").to_pylist():
        groups.setdefault(r["group"], set()).add(r["key"])
    for members in groups.values():
        assert all(m in folds[0] for m in members) or not any(m in folds[0] for m in members)
    corrections = pq.read_table(run / "rounds/0/corrections.parquet").to_pylist()
    assert corrections
    for c in corrections:  # each proposed by the fold that hid its label
        held = folds[0].get(c["key"]) or folds[1][c["key"]]
        assert c["new"] == held["predicted_label"] != c["old"] == held["noisy_label"]
    record = summary["rounds"][0]
    assert record["folds"] == 2 and record["corrections"] == len(corrections)
    assert json.loads((run / "rounds/0/round.json").read_text()) == record


def test_cross_fitting_is_refused_where_it_cannot_hide_a_label():
    for extra, key in [
        ([], "train.refine_rounds"),
        (["train.refine_rounds=1", "method.name=iam"], "method.name"),
        (["train.refine_rounds=1", "method.elr_refine_from=3"], "method.elr_refine_from"),
        (["train.refine_rounds=1", "train.refine_init=warm"], "train.refine_init"),
        (["train.refine_rounds=1", "train.refine_folds=1"], "train.refine_folds"),
    ]:
        cfg = load_config(None, ["train.refine_folds=2", *extra])
        with pytest.raises(ConfigError, match=key):
            cfg.validate()
    load_config(None, ["train.refine_folds=2", "train.refine_rounds=1"]).validate()
    search_base = load_config(None, ["train.refine_folds=2", "train.refine_rounds=1"])
    search_base.explicit_keys.discard("train.refine_rounds")
    _one_round(search_base)
    assert search_base.train.refine_folds == search_base.train.refine_rounds == 0
    search_base.validate()

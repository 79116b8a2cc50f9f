"""The trainer end to end on tiny generated shards: it learns, writes its report, resumes
exactly, and refuses bad configs before doing any work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    CONFIGS,
    copy_dataset,
    random_batch,
    rewrite_shard,
    small_overrides,
    stripes_dataset,
    write_stripes,
)
from PIL import Image

from dtrain.config import load_config
from dtrain.errors import ConfigError, RunFolderError
from dtrain.methods.model import build_model
from dtrain.methods.registry import METHODS
from dtrain.methods.steps import memory_rule, training_step
from dtrain.train import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Horizontal vs vertical stripes, 160 per class, 20% symmetric label noise."""
    return stripes_dataset(tmp_path_factory.mktemp("tiny"), 160, shard_size=16)


def config(data: Path, run_dir: Path, *overrides: str):
    return load_config(None, small_overrides(data, run_dir, 16, *overrides))


def test_two_epochs_learn_and_leave_a_report(tiny, tmp_path, capsys):
    epochs_seen = []
    run = tmp_path / "run"
    summary = train(config(tiny, run), on_epoch_end=lambda m, p: epochs_seen.append((m, p)))
    printed = capsys.readouterr().out
    assert re.search(r"\(clean [01]\.\d{3}\)", printed)  # injected noise: clean figures too
    assert "test (clean labels)" in printed
    assert summary["test_last"]["clean_accuracy"] >= 0.7  # chance is 0.5 on 64 test images
    assert summary["test_last"]["samples"] == 64
    assert [m["epoch"] for m, _ in epochs_seen] == [1, 2]
    assert all(p == run / "last.pt" for _, p in epochs_seen)
    for name in ("config.yaml", "last.pt", "best.pt", "summary.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert Image.open(run / "curves.png").size[0] > 500
    assert any((run / "tensorboard").iterdir())
    epochs = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    ]
    assert len(epochs) == 2 and {"val_accuracy", "val_clean_accuracy"} <= set(epochs[0])
    scores = pq.read_table(run / "label_scores.parquet").to_pylist()
    assert len(scores) == 224  # every train sample once
    assert [r["rank"] for r in scores] == list(range(1, 225))
    assert scores[0]["score"] >= scores[-1]["score"]
    assert {
        "key",
        "noisy_label",
        "predicted_label",
        "score",
        "attention_score",
        "loss_score",
        "is_noisy",
        "source",
    } <= set(scores[0])
    assert set(summary["mislabel_auroc"]) == {"loss"}  # the default has no attention to rank by
    assert load_config(run / "config.yaml").to_dict() == config(tiny, run).to_dict()


@pytest.mark.parametrize("stop_at", [3, 17], ids=["epoch1", "epoch2"])
@pytest.mark.slow
def test_resume_after_a_stop_gives_the_same_weights(tiny, tmp_path, capsys, stop_at):
    """Stopped mid-epoch (14 steps an epoch), resumed: the same weights, and the same epoch
    records (the resumed epoch's train figures over all of its samples)."""
    straight = tmp_path / "straight"
    train(config(tiny, straight))

    interrupted = tmp_path / "interrupted"
    stop = threading.Event()
    result = train(
        config(tiny, interrupted, "train.log_every=5"),
        on_step=lambda info: info.step == stop_at and stop.set(),
        stop=stop,
    )
    epoch, batch = divmod(stop_at + 5 - stop_at % 5, 14)  # stops at the next log step
    assert result == {"stopped": True, "epoch": epoch, "batch": batch}
    # counted from 1, as the epoch lines and progress bars count
    assert f"stopped after batch {batch} of 14 in epoch {epoch + 1};" in capsys.readouterr().out
    train(config(tiny, interrupted), resume=True)

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["state"]["step"] == b["state"]["step"]
    history_a, history_b = (json.loads(c["state"]["history"]) for c in (a, b))
    assert history_a[-1]["val_accuracy"] == history_b[-1]["val_accuracy"]
    for record_a, record_b in zip(history_a, history_b, strict=True):
        for key in ("train_loss", "train_accuracy", "train_ce", "corrupt_samples"):
            assert record_a[key] == record_b[key], (record_a["epoch"], key)


def test_mid_epoch_checkpoints_by_time_hold_the_loader_position(tiny, tmp_path):
    run = tmp_path / "run"
    seen = {}

    def on_step(info):
        if info.step == 5:  # the log step at 4 found its minute (here: 6 ms) passed
            seen.update(torch.load(run / "last.pt", weights_only=True)["state"])

    cfg = config(tiny, run, "train.epochs=1", "train.log_every=2")
    cfg.train.checkpoint_every_minutes = 1e-4
    train(cfg, on_step=on_step)
    assert (seen["epoch"], seen["batch"], seen["step"]) == (0, 4, 4)


def test_a_run_killed_before_its_first_checkpoint_starts_over_under_resume(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 2}\n{"kind": "st')
    cfg = config(tiny, run, "train.epochs=1")
    with pytest.raises(RunFolderError, match="holds no run to resume"):
        train(cfg, resume=True)
    from dtrain.config import save_config

    save_config(config(tiny, run, "train.epochs=1", "method.name=ce"), run / "config.yaml")
    with pytest.raises(RunFolderError, match="config.yaml was written with a different config"):
        train(cfg, resume=True)
    save_config(cfg, run / "config.yaml")
    train(cfg, resume=True)  # what a killed first attempt left: its config, a log
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [10]  # the old lines are gone


def test_an_existing_run_is_never_overwritten(tiny, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, run, "train.epochs=1"))
    before = (run / "last.pt").read_bytes()
    with pytest.raises(RunFolderError, match="--resume"):
        train(config(tiny, run, "train.epochs=1"))
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.multiproc
def test_eval_command_reports_the_best_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(config(tiny, run, "train.epochs=1", "method.name=ce"))
    result = subprocess.run(
        [sys.executable, "-m", "dtrain", "eval", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert printed["split"] == "test" and printed["checkpoint"] == "best"
    assert printed["accuracy"] == pytest.approx(summary["test_best"]["accuracy"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_finite_step(method):
    cfg = load_config(
        None, [f"method.name={method}", "model.backbone=test_resnet", "method.group_size=4"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, method, num_classes=3, in_chans=1)
    batch = {
        "view1": torch.randn(16, 1, 32, 32),
        "view2": torch.randn(16, 1, 32, 32),
        "label": torch.randint(0, 3, (16,)),
        "valid": torch.ones(16, dtype=torch.bool),
    }
    batch["valid"][-3:] = False  # padding never breaks a loss
    rule = memory_rule(cfg.method, num_classes=3)
    if rule is not None:  # a mid-run memory: ELR's targets, DivideMix's division
        batch["memory"] = torch.rand(16, rule.width).softmax(-1)
    epoch = 6 if method == "dividemix" else 1  # after its warm-up
    out = training_step(model, batch, cfg.method, epoch=epoch, num_classes=3, forget_rate=0.2)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert (out.attention is not None) == METHODS[method].attention
    expected_terms = {
        "iam": {"ce", "iam", "con"},
        "iam_no_con": {"ce", "iam"},
        "iam_no_mixup": {"ce", "con"},
        "afm": {"afm"},
        "elr": {"ce", "elr"},
        "iam_elr": {"ce", "iam", "con", "elr"},
        "con_elr": {"ce", "con", "elr"},
        "dividemix": {"l_x", "l_u", "l_reg", "labelled"},
    }.get(method, {method})
    assert set(out.terms) == expected_terms
    assert (out.memory is not None) == (rule is not None)
    if rule is not None:
        assert out.memory.shape == (16, rule.width) and not out.memory.requires_grad


def test_feature_and_logit_mixup_give_the_same_training_loss():
    losses = {}
    for space in ("feature", "logit"):
        cfg = load_config(
            None,
            [
                "method.name=iam",
                "model.backbone=test_resnet",
                "method.group_size=4",
                f"method.mixup_space={space}",
                "method.lambda_con=0",
            ],
        )
        torch.manual_seed(0)
        model = build_model(cfg.model, "iam", num_classes=3, in_chans=1)
        batch = random_batch()
        losses[space] = training_step(model, batch, cfg.method, 1, 3, 0.0).terms["iam"]
    torch.testing.assert_close(losses["feature"], losses["logit"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads_and_validates(preset):
    cfg = load_config(CONFIGS / preset)
    cfg.validate()
    assert cfg.method.name == preset.removesuffix(".yaml")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["method.name=iam", "method.group_size=6"],
            r"method.group_size=6 .*divisor of the per-rank batch",
        ),
        (["method.temperature=0"], r"method.temperature=0.0 .*> 0"),
        (["method.mixup_alpha=-1"], r"method.mixup_alpha=-1.0 .*>= 0"),
        (["optim.lrr=0.1"], r"unknown config key 'optim.lrr'; did you mean optim.lr\?"),
        (["temperature=0.1"], r"did you mean method.temperature\?"),
        (["method.name=mixupp"], r"method.name='mixupp' .*one of"),
        (["train.epochs=many"], r"train.epochs='many' is invalid: must be an int"),
        (["data.batch_size"], r"must look like section.key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides).validate()


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: gce\n  gce_q: 0.5\noptim:\n  lr: 0.2\n")
    cfg = load_config(path, ["optim.lr=0.01"])
    assert (cfg.method.name, cfg.method.gce_q, cfg.optim.lr) == ("gce", 0.5, 0.01)
    path.write_text("method:\n  nmae: gce\n")
    with pytest.raises(ConfigError, match="did you mean method.name"):
        load_config(path)


def test_cli_rejects_a_bad_key_before_any_work(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "train",
            f"train.run_dir={tmp_path / 'r'}",
            "method.group_szie=4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "did you mean method.group_size?" in result.stderr
    assert not (tmp_path / "r").exists()


def poisoned_baseline(monkeypatch, poisoned_steps: set[int], kind: str = "loss") -> None:
    """Fault injection: the CE step's loss is NaN on the given (1-based) calls, or (`input`)
    one image of its batch, a NaN activation that reaches the batch-norm statistics."""
    from dtrain.methods import steps

    original, calls = steps.ce_step, [0]

    def step(model, batch, ctx):
        calls[0] += 1
        if calls[0] in poisoned_steps and kind == "input":
            batch = {**batch, "view1": batch["view1"].clone()}
            batch["view1"][0] = float("nan")
        out = original(model, batch, ctx)
        if calls[0] in poisoned_steps and kind == "loss":
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(steps, "ce_step", step)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tiny, tmp_path, monkeypatch):
    poisoned_baseline(monkeypatch, {1, 3})  # the very first step too: no state exists yet
    run = tmp_path / "run"
    summary = train(config(tiny, run, "method.name=ce", "train.epochs=1"))
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    assert state["skipped_steps"] == 2 and state["step"] == 14
    assert all(
        torch.isfinite(v).all()
        for v in torch.load(run / "last.pt", weights_only=True)["model"].values()
    )
    assert summary["test_last"]["clean_accuracy"] > 0.5


def test_divergence_stops_with_the_weights_before_it(tiny, tmp_path, monkeypatch):
    from dtrain.errors import NonFiniteLossError
    from dtrain.train.rng import seed_everything

    poisoned_baseline(monkeypatch, set(range(1, 100)))
    run = tmp_path / "run"
    cfg = config(tiny, run, "method.name=ce", "train.max_nonfinite_steps=3", "train.log_every=1")
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row \(epoch 1, step 3\)"):
        train(cfg)
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["state"]["skipped_steps"] == 3
    seed_everything(0)
    initial = build_model(cfg.model, "ce", num_classes=2, in_chans=1)
    # no step was taken: the weights, the batch-norm statistics and the average are the first
    for name, tensor in initial.state_dict().items():
        assert torch.equal(saved["model"][name], tensor), name
        assert torch.equal(saved["ema"][name], tensor.to(saved["ema"][name].dtype)), name


def test_a_nonfinite_activation_leaves_the_batchnorm_statistics_finite(tiny, tmp_path, monkeypatch):
    """A NaN image in step 3: its forward pass made the running statistics NaN before the
    step was skipped; they are put back, in the network and so in its average. (In the first
    epoch of two: the mislabel scores of the last one would take the NaN sample loss.)"""
    poisoned_baseline(monkeypatch, {3}, kind="input")
    run = tmp_path / "run"
    summary = train(config(tiny, run, "method.name=ce"))
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["state"]["skipped_steps"] == 1
    for part in ("model", "ema"):
        for name, tensor in saved[part].items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (part, name)
    assert summary["test_last"]["clean_accuracy"] > 0.5


def test_a_dataset_without_injected_noise_reports_no_clean_figures(tmp_path, capsys):
    """Its clean labels are the labels as shipped: a "clean" figure would only repeat them."""
    from dtrain.prepare import PrepareConfig, prepare

    write_stripes(tmp_path / "img", 48)
    data = prepare(
        PrepareConfig(source=str(tmp_path / "img"), out=str(tmp_path / "ds"), progress=False)
    )
    summary = train(config(data, tmp_path / "run", "method.name=ce", "train.epochs=1"))
    printed = capsys.readouterr().out
    assert "val acc 0." in printed and "test (as shipped)" in printed
    assert "clean" not in printed, printed
    assert summary["test_last"]["samples"] > 0


def test_a_corrupt_training_sample_is_counted_in_the_run(tiny, tmp_path):
    data = copy_dataset(tiny, tmp_path / "ds")
    shard = sorted(data.glob("train-*.tar"))[0]
    victim = []

    def truncate_first(sample):
        if not victim:
            victim.append(sample["__key__"])
            image = next(k for k in sample if k in ("png", "jpg"))
            sample[image] = sample[image][:40]
        return sample

    rewrite_shard(shard, truncate_first)
    run = tmp_path / "run"
    train(config(data, run, "method.name=ce", "train.epochs=1"))
    history = json.loads(torch.load(run / "last.pt", weights_only=True)["state"]["history"])
    assert history[0]["corrupt_samples"] == 1
    skipped = json.loads((run / "summary.json").read_text())["skipped_samples"]
    assert skipped["count"] == 1 and len(skipped["which"]) == 1
    assert shard.name in skipped["which"][0] and victim[0] in skipped["which"][0]


def test_the_default_trains_exactly_as_the_measured_iam_elr_without_its_mixup(tiny, tmp_path):
    """benchmarks/main_job.py measured `iam_elr` with `method.lambda_iam=0`; `con_elr` ships
    it under its own name: the same weights after a run, bit for bit."""
    runs = {
        "measured": ["method.name=iam_elr", "method.lambda_iam=0"],
        "shipped": ["method.name=con_elr"],
    }
    weights = {}
    for name, overrides in runs.items():
        train(config(tiny, tmp_path / name, "train.epochs=1", *overrides))
        weights[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    assert load_config(None, []).method.name == "con_elr"
    for key, tensor in weights["measured"].items():
        assert torch.equal(tensor, weights["shipped"][key]), key

"""A DeepSpeed JSON config reconciled with the dtrain config: "auto" values filled, DeepSpeed values
taken where the user set none, contradictions refused, the given config left untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtrain.config import load_config
from dtrain.errors import ConfigError
from dtrain.train.deepspeed_config import resolve_deepspeed_config


def ds_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(values))
    return path


AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "bf16": {"enabled": "auto"},
}

USUAL = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.01}},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2},
}


def test_deepspeed_auto_values_are_filled_from_dtrain(tmp_path):
    config = load_config(
        None, ["data.batch_size=16", "train.grad_accum_steps=3", "optim.grad_clip=2.0"]
    )
    resolved, config = resolve_deepspeed_config(ds_file(tmp_path, AUTO), config, "fp32", 4)
    ds = resolved.config
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 2.0
    assert ds["train_batch_size"] == 16 * 3 * 4
    assert ds["bf16"]["enabled"] is False
    assert resolved.stage == 0
    assert not resolved.builds_optimizer and not resolved.builds_scheduler
    assert (config.data.batch_size, config.train.grad_accum_steps, config.optim.grad_clip) == (
        16,
        3,
        2.0,
    )
    # defaults fill them the same way; bf16 follows the precision
    config = load_config(None, [])
    ds = resolve_deepspeed_config(ds_file(tmp_path, AUTO), config, "bf16", 2)[0].config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 1)
    assert (ds["gradient_clipping"], ds["train_batch_size"]) == (5.0, 128)
    assert ds["bf16"]["enabled"] is True


def test_deepspeed_values_win_over_defaults_the_user_never_set(tmp_path):
    given = load_config(None, [])
    path = ds_file(tmp_path, USUAL)
    resolved, config = resolve_deepspeed_config(path, given, "fp32", 1)
    assert given.optim.lr == load_config(None, []).optim.lr != 0.001  # the given one untouched
    assert config.optim.lr == 0.001
    assert config.optim.grad_clip == 1.0
    assert config.optim.weight_decay == 0.01
    assert config.optim.name == "adamw"
    config.validate()
    assert resolved.builds_optimizer and not resolved.builds_scheduler
    assert resolved.stage == 2
    ds = resolved.config
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"] == {"lr": 0.001, "weight_decay": 0.01}
    assert ds["train_batch_size"] == 64
    notes = "\n".join(resolved.notes)
    assert "optim.lr=0.001" in notes
    assert "optim.grad_clip=1.0" in notes
    assert "optim.weight_decay=0.01" in notes
    assert "DeepSpeed's AdamW" in notes
    assert "warm-up + cosine" in notes  # no scheduler section: dtrain's schedule


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.grad_clip=5.0", "optim.grad_clip"),  # explicit, even though it is the default
        ("optim.lr=0.1", "optim.lr"),
        ("optim.name=sgd", "optim.name"),
    ],
)
def test_deepspeed_values_that_contradict_user_settings_are_refused(tmp_path, override, key):
    config = load_config(None, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_deepspeed_config(ds_file(tmp_path, USUAL), config, "fp32", 1)


def test_deepspeed_train_batch_size_must_match(tmp_path):
    config = load_config(None, ["data.batch_size=16"])
    ok, _ = resolve_deepspeed_config(ds_file(tmp_path, {"train_batch_size": 32}), config, "fp32", 2)
    assert ok.config["train_batch_size"] == 32
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_deepspeed_config(ds_file(tmp_path, {"train_batch_size": 100}), config, "fp32", 2)


def test_deepspeed_train_batch_size_error_does_not_call_the_product_the_world_size(tmp_path):
    config = load_config(None, ["data.batch_size=16"])
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_config(ds_file(tmp_path, {"train_batch_size": 100}), config, "fp32", 2)
    assert "world size = 32" not in str(err.value)


def test_deepspeed_fp16_is_refused_and_scheduler_is_honoured(tmp_path):
    config = load_config(None, [])
    with pytest.raises(ConfigError, match="fp16"):
        resolve_deepspeed_config(ds_file(tmp_path, {"fp16": {"enabled": True}}), config, "fp32", 1)
    scheduler = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    resolved, _ = resolve_deepspeed_config(ds_file(tmp_path, scheduler), config, "fp32", 1)
    assert resolved.builds_scheduler and not resolved.builds_optimizer
    assert any("DeepSpeed's WarmupLR" in note for note in resolved.notes)


def test_deepspeed_bf16_wins_unless_the_user_set_the_precision(tmp_path):
    path = ds_file(tmp_path, {"bf16": {"enabled": True}})
    resolved, config = resolve_deepspeed_config(path, load_config(None, []), "fp32", 1)
    assert config.train.precision == "bf16" and resolved.config["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_deepspeed_config(path, load_config(None, ["train.precision=fp32"]), "fp32", 1)


def test_deepspeed_precision_change_is_reported(tmp_path):
    path = ds_file(tmp_path, {"bf16": {"enabled": True}})
    resolved, _ = resolve_deepspeed_config(path, load_config(None, []), "fp32", 1)
    assert any("train.precision" in note for note in resolved.notes)


def test_deepspeed_train_batch_size_alone_sets_the_per_rank_batch(tmp_path):
    path = ds_file(tmp_path, {"train_batch_size": 256})
    config = load_config(None, ["train.grad_accum_steps=2"])
    resolved, config = resolve_deepspeed_config(path, config, "fp32", 4)
    assert config.data.batch_size == 32
    assert resolved.config["train_micro_batch_size_per_gpu"] == 32
    assert any("data.batch_size=32" in note for note in resolved.notes)
    with pytest.raises(ConfigError, match="train_batch_size"):  # the user's own batch stands
        resolve_deepspeed_config(path, load_config(None, ["data.batch_size=16"]), "fp32", 4)

"""A standard DeepSpeed JSON config, with its "auto" values filled from the dtrain config and any
value that contradicts it refused, so that the two can never silently disagree."""

from __future__ import annotations

import json
from pathlib import Path

from dtrain.config import Config, ConfigError


def resolve_deepspeed_config(
    path: str | Path, config: Config, precision: str, world_size: int
) -> dict:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {err}") from err
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{path}: remove the {section!r} section; dtrain builds the "
                "optimiser and learning-rate schedule from optim.*"
            )
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: fp16 is not supported; use bf16 (train.precision=bf16)")
    micro = config.data.batch_size
    ours = {
        ("train_micro_batch_size_per_gpu",): (micro, "data.batch_size"),
        ("gradient_accumulation_steps",): (1, "gradient accumulation (dtrain steps every batch)"),
        ("gradient_clipping",): (max(config.optim.grad_clip, 0.0), "optim.grad_clip"),
        ("bf16", "enabled"): (precision == "bf16", "train.precision"),
        ("train_batch_size",): (micro * world_size, "data.batch_size x world size"),
    }
    for keys, (value, source) in ours.items():
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            name = ".".join(keys)
            raise ConfigError(
                f"{path}: {name}={current!r} contradicts {source} = {value!r}; "
                f'set {name} to "auto" or change {source}'
            )
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    return ds

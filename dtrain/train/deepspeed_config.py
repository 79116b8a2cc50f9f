"""A DeepSpeed JSON config as users write it, reconciled with the dtrain config.

For each value both can set: DeepSpeed's "auto" (or nothing) takes dtrain's; a DeepSpeed value
wins over a dtrain default the user never set (the resolved dtrain config takes it and the
change is reported, so config.yaml records what ran); a DeepSpeed value that contradicts a
value the user did set is refused. An `optimizer` or `scheduler` section is honoured: DeepSpeed
then builds it (its own optimizers are what ZeRO-Offload needs)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.config import Config, set_key
from dtrain.errors import ConfigError

# DeepSpeed optimizer types and the optim.name each one corresponds to
DS_OPTIMIZERS = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd"}


@dataclass
class ResolvedDeepSpeed:
    config: dict
    notes: list[str] = field(default_factory=list)  # what came from where, for the run's log

    @property
    def stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    @property
    def builds_optimizer(self) -> bool:
        return "optimizer" in self.config

    @property
    def builds_scheduler(self) -> bool:
        return "scheduler" in self.config


def _reconcile(
    ds: dict,
    keys: tuple[str, ...],
    config: Config,
    dtrain_key: str | None,
    ours: Any,
    notes: list[str],
    source: str = "",
) -> None:
    """One value both configs can hold; see the module docstring for the rule. `dtrain_key`
    None: a value derived from several keys (`source` names them), never overridden."""
    node = ds
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    name = ".".join(keys)
    theirs = node.get(keys[-1], "auto")
    if theirs == "auto":
        node[keys[-1]] = ours
        return
    if theirs == ours:
        return
    if dtrain_key is None or dtrain_key in config.explicit_keys:
        source = source or dtrain_key
        raise ConfigError(
            f"DeepSpeed {name}={theirs!r} contradicts {ours!r} from {source}; "
            f'set {name} to "auto" in the DeepSpeed file or change {source}'
        )
    try:
        set_key(config, dtrain_key, theirs)
    except ConfigError as err:
        raise ConfigError(f"DeepSpeed {name}={theirs!r} cannot be used: {err}") from None
    notes.append(f"{dtrain_key}={theirs!r} from the DeepSpeed config ({name})")


def resolve_deepspeed_config(
    path: str | Path, config: Config, precision: str, world_size: int
) -> tuple[ResolvedDeepSpeed, Config]:
    """The DeepSpeed config dict to pass to deepspeed.initialize, and a copy of `config` with
    the values the DeepSpeed file decides."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {err}") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    for name in ("fp16", "bf16", "zero_optimization", "optimizer", "scheduler"):
        if not isinstance(ds.get(name, {}), dict):
            raise ConfigError(f"DeepSpeed config {path}: {name}={ds[name]!r} must be an object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if type(stage) is not int or not 0 <= stage <= 3:
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.stage={stage!r} is invalid: "
            "must be 0, 1, 2 or 3"
        )
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: fp16 is not supported; use bf16 (train.precision=bf16)")
    notes: list[str] = []
    c = copy.deepcopy(config)
    o, t = c.optim, c.train
    # a file that gives only the global batch sets the per-rank batch, where that is free
    total = ds.get("train_batch_size", "auto")
    micro_batches = t.grad_accum_steps * world_size  # per optimiser step, all ranks
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    free = "data.batch_size" not in c.explicit_keys and micro == "auto"
    if (
        free
        and total != "auto"
        and total != c.data.batch_size * micro_batches
        and total % micro_batches == 0
    ):
        set_key(c, "data.batch_size", total // micro_batches)
        ds["train_micro_batch_size_per_gpu"] = c.data.batch_size
        notes.append(f"data.batch_size={c.data.batch_size} from the DeepSpeed train_batch_size")
    _reconcile(
        ds, ("train_micro_batch_size_per_gpu",), c, "data.batch_size", c.data.batch_size, notes
    )
    _reconcile(
        ds, ("gradient_accumulation_steps",), c, "train.grad_accum_steps", t.grad_accum_steps, notes
    )
    _reconcile(ds, ("gradient_clipping",), c, "optim.grad_clip", o.grad_clip, notes)
    if t.precision != "auto":
        precision = t.precision
    bf16 = ds.setdefault("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        ds["bf16"]["enabled"] = precision == "bf16"
    elif bf16 != (precision == "bf16"):
        if "train.precision" in c.explicit_keys:
            raise ConfigError(
                f"DeepSpeed bf16.enabled={bf16} contradicts train.precision={t.precision!r}; "
                'set bf16.enabled to "auto" in the DeepSpeed file or change train.precision'
            )
        set_key(c, "train.precision", "bf16" if bf16 else "fp32")
        notes.append(f"train.precision={t.precision!r} from the DeepSpeed config (bf16.enabled)")
    global_batch = c.data.batch_size * micro_batches
    _reconcile(
        ds,
        ("train_batch_size",),
        c,
        None,
        global_batch,
        notes,
        source="data.batch_size x train.grad_accum_steps x world size",
    )
    if "optimizer" in ds:
        kind = str(ds["optimizer"].get("type", ""))
        name = DS_OPTIMIZERS.get(kind.lower())
        if name is not None and name != o.name:
            if "optim.name" in c.explicit_keys:
                raise ConfigError(
                    f"DeepSpeed optimizer type {kind!r} contradicts optim.name={o.name!r}; "
                    "remove one of them"
                )
            set_key(c, "optim.name", name)
            notes.append(f"optim.name={name!r} from the DeepSpeed config (optimizer.type)")
        _reconcile(ds, ("optimizer", "params", "lr"), c, "optim.lr", o.lr, notes)
        _reconcile(
            ds,
            ("optimizer", "params", "weight_decay"),
            c,
            "optim.weight_decay",
            o.weight_decay,
            notes,
        )
        notes.append(f"optimizer: DeepSpeed's {kind} from {path}")
    else:
        notes.append(f"optimizer: dtrain's {o.name} (optim.*)")
    notes.append(
        f"learning-rate schedule: DeepSpeed's {ds['scheduler'].get('type')} from {path}"
        if "scheduler" in ds
        else "learning-rate schedule: dtrain's warm-up + cosine (optim.lr, optim.warmup_epochs)"
    )
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    return ResolvedDeepSpeed(ds, notes), c

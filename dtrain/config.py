"""The run configuration: one typed dataclass tree, loaded from YAML with `key=value` overrides and
validated before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtrain.errors import ConfigError

METHODS = ("iam", "iam_no_con", "iam_no_mixup", "afm", "ce", "mixup", "gce", "sce", "coteaching")
ATTENTION_INPUTS = ("feature", "feature+label", "feature+label+confidence")


@dataclass
class DataConfig:
    # dataset folder written by `dtrain prepare`; empty: the embedded Br35H set, prepared if missing
    path: str = ""
    image_size: int = 64
    batch_size: int = 64  # per rank
    num_workers: int = 1
    shuffle_buffer: int = 1000
    # resampled: draw shards with replacement, `samples_per_epoch` samples per epoch
    resampled: bool = False
    samples_per_epoch: int = 0
    strict: bool = False  # fail on a corrupt sample instead of skipping it


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    pretrained: bool = False  # needs the hub; off because nothing can be downloaded offline
    # "imagenet": the backbone's own stem; "small": 3x3 stride-1 stem, no max-pool (<= 32 px)
    stem: str = "imagenet"
    projection_hidden: int = 512
    projection_dim: int = 128
    attention_hidden: int = 128
    attention_inputs: str = "feature+label+confidence"
    sync_batchnorm: bool = False  # batch statistics over all ranks (several processes only)


@dataclass
class MethodConfig:
    # iam: CE + contrastive + intra-group attention mixup (method.md); iam_no_con / iam_no_mixup:
    # its ablations; afm: AFM as published (K=2 halves); ce, mixup, gce, sce, coteaching: baselines
    name: str = "iam"
    group_size: int = 8  # K
    temperature: float = 0.5  # tau of NT-Xent
    mixup_alpha: float = 1.0  # Beta(alpha, alpha) prior; <= 0 means lam = 0.5
    lambda_iam: float = 1.0
    lambda_con: float = 1.0
    mixup_space: str = "logit"  # "logit": exact shortcut; "feature": mix pooled features
    mixup_backend: str = (
        "auto"  # auto: fused Triton op on CUDA, torch reference on CPU | triton | torch
    )
    warmup_epochs: int = 0  # epochs of plain CE (+ contrastive) before the mixup term starts
    gce_q: float = 0.7
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    coteaching_forget_rate: float = -1.0  # < 0: the train noise rate recorded in dataset.json
    coteaching_ramp_epochs: int = 10
    score_epochs: int = 5  # mislabel scores average the attention over the last N epochs


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear learning-rate warm-up, then cosine to zero
    grad_clip: float = 5.0  # <= 0: off


@dataclass
class TrainConfig:
    epochs: int = 25  # the main job (64 px) then fits in 15 min on a 2-core CPU
    seed: int = 0
    run_dir: str = ""  # empty: runs/<method>_seed<seed>
    precision: str = "auto"  # auto: bf16 autocast where supported (CUDA), else fp32 | bf16 | fp32
    log_every: int = 10  # steps between JSONL/TensorBoard step logs
    progress: bool = True
    max_nonfinite_steps: int = 20  # stop (with a checkpoint) after this many in a row
    # checkpoint and exit after this many steps in this invocation (0: never); for jobs cut into
    # time-limited pieces, each continued with --resume
    stop_after_steps: int = 0
    dist_timeout_s: int = 600  # how long a rank waits for the others before it gives up
    # DeepSpeed: a standard JSON config (configs/deepspeed/zero{1,2,3}.json); "auto" values are
    # filled from this config. backend "accelerate" runs it through Accelerate's DeepSpeed plugin,
    # "deepspeed" through deepspeed.initialize (for the `deepspeed` launcher).
    deepspeed: str = ""
    backend: str = "accelerate"


# keys that say how to run, not what to compute: a resumed run may change them
OPERATIONAL_KEYS = (
    "train.progress",
    "train.log_every",
    "train.stop_after_steps",
    "train.max_nonfinite_steps",
    "train.dist_timeout_s",
    "optim.lr",
    "optim.warmup_epochs",
    "optim.grad_clip",
)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        d, m, o, t, mo = self.data, self.method, self.optim, self.train, self.model
        _check(m.name in METHODS, "method.name", m.name, f"one of {METHODS}")
        _check(
            mo.attention_inputs in ATTENTION_INPUTS,
            "model.attention_inputs",
            mo.attention_inputs,
            f"one of {ATTENTION_INPUTS}",
        )
        _check(mo.stem in ("imagenet", "small"), "model.stem", mo.stem, "imagenet or small")
        _check(
            m.mixup_space in ("logit", "feature"),
            "method.mixup_space",
            m.mixup_space,
            "logit or feature",
        )
        _check(o.name in ("sgd", "adamw"), "optim.name", o.name, "sgd or adamw")
        _check(
            t.precision in ("auto", "bf16", "fp32"),
            "train.precision",
            t.precision,
            "auto, bf16 or fp32",
        )
        _check(m.temperature > 0, "method.temperature", m.temperature, "> 0")
        _check(m.mixup_alpha >= 0, "method.mixup_alpha", m.mixup_alpha, ">= 0")
        _check(m.group_size >= 2, "method.group_size", m.group_size, ">= 2")
        uses_groups = m.name in ("iam", "iam_no_con", "iam_no_mixup")
        _check(
            not uses_groups or d.batch_size % m.group_size == 0,
            "method.group_size",
            m.group_size,
            f"a divisor of the per-rank batch data.batch_size={d.batch_size}",
        )
        _check(
            m.name != "afm" or d.batch_size % 2 == 0,
            "data.batch_size",
            d.batch_size,
            "even for afm (pairs i with i + B/2)",
        )
        _check(d.batch_size >= 2, "data.batch_size", d.batch_size, ">= 2")
        _check(d.image_size >= 16, "data.image_size", d.image_size, ">= 16")
        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
        _check(
            not d.resampled or d.samples_per_epoch > 0,
            "data.samples_per_epoch",
            d.samples_per_epoch,
            "> 0 in resampled mode",
        )
        _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        _check(0 <= m.gce_q <= 1, "method.gce_q", m.gce_q, "in [0, 1]")
        _check(m.score_epochs >= 1, "method.score_epochs", m.score_epochs, ">= 1")
        _check(
            m.mixup_backend in ("auto", "triton", "torch"),
            "method.mixup_backend",
            m.mixup_backend,
            "auto, triton or torch",
        )
        _check(not uses_groups or m.group_size <= 32, "method.group_size", m.group_size, "<= 32")
        for key in ("lambda_iam", "lambda_con", "warmup_epochs"):
            _check(getattr(m, key) >= 0, f"method.{key}", getattr(m, key), ">= 0")
        _check(
            t.backend in ("accelerate", "deepspeed"),
            "train.backend",
            t.backend,
            "accelerate or deepspeed",
        )
        _check(
            t.backend != "deepspeed" or bool(t.deepspeed),
            "train.deepspeed",
            t.deepspeed,
            "a DeepSpeed JSON config when train.backend=deepspeed",
        )
        _check(
            not t.deepspeed or Path(t.deepspeed).is_file(),
            "train.deepspeed",
            t.deepspeed,
            "an existing DeepSpeed JSON file",
        )
        _check(
            t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, ">= 1"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The config less its operational keys: what a resumed run must share."""
        values = self.to_dict()
        for key in OPERATIONAL_KEYS:
            section, name = key.split(".")
            values[section].pop(name)
        return values


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {expected}")


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass, dotted: `optim.lr`, ..."""
    out = []
    for name, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            out += _keys(kind, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a bare leaf name: `lr` -> `optim.lr`
        close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """A YAML or command-line value as the field's type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return None if value is None else _coerce(value, options[0], key)
    if isinstance(value, str) and kind is not str:
        value = yaml.safe_load(value) if value != "" else value
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        return "" if value is None else str(value)
    raise ConfigError(f"{key}={value!r} is not a valid {kind.__name__}")


def _apply(node: Any, values: dict, prefix: str, valid: list[str]) -> None:
    hints = typing.get_type_hints(type(node))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown(key, valid)
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give {key}.<field>=value")
            _apply(current, value, f"{key}.", valid)
        else:
            setattr(node, name, _coerce(value, hints[name], key))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; not yet validated."""
    config = Config()
    valid = _keys(Config)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        _apply(config, values, "", valid)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _apply(config, nested, "", valid)
    return config


def config_from_dict(values: dict) -> Config:
    config = Config()
    _apply(config, values, "", _keys(Config))
    return config


def save_config(config: Config, path: Path) -> None:
    from dtrain.train.checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

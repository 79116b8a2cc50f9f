"""The run configuration: one typed dataclass tree, read from defaults, then a YAML file, then
`section.key=value` overrides, and validated before any work starts.

Choices are `Literal` types that the coercion enforces. Keys marked `operational` say how to run,
not what to compute: a resumed run may change them. The config remembers which keys the user set
(`explicit_keys`), so that a method's implied values and a DeepSpeed file's own values only fill
what the user left at its default."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dtrain.config_values import coerce, read_yaml_mapping
from dtrain.errors import ConfigError
from dtrain.files import write_atomic
from dtrain.methods.registry import METHODS, MethodName


def operational(default: Any, alters_result: bool = False) -> Any:
    """A field that a resumed run may change. Most say how the run is carried out, not what it
    computes; those with `alters_result` (the learning-rate schedule, say) change the weights,
    so a finished clean-up round is not reused across them (`Config.result_identity`)."""
    metadata = {"operational": True, "alters_result": alters_result}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# the rules of dtrain.train.selection: which weights become best.pt
SelectRule = Literal["last", "ema_last", "noisy_val", "noisy_val_smoothed", "ema_noisy_val"]
TrackerName = Literal["tensorboard", "mlflow", "wandb"]


@dataclass
class DataConfig:
    # dataset folder written by `dtrain prepare`; empty: the embedded Br35H set, prepared if missing
    path: str = ""
    # the main job's size: it then fits 15 min on a 2-core CPU (docs/results.md); on a GPU
    # cluster use the scans' resolution, e.g. data.image_size=224 model.backbone=resnet50
    image_size: int = 32
    batch_size: int = 64  # per rank and per micro-step
    num_workers: int = 1
    shuffle_buffer: int = 1000
    # resampled: draw shards with replacement, `samples_per_epoch` samples per epoch
    resampled: bool = False
    samples_per_epoch: int = 0
    strict: bool = False  # fail on a corrupt sample instead of skipping it
    # given: train on the labels as given (noisy); clean: on the clean labels the dataset keeps
    # beside them (`dtrain prepare --noise` or --clean-label-column), a benchmark's ceiling
    train_labels: Literal["given", "clean"] = "given"


@dataclass
class ModelConfig:
    backbone: str = "resnet10t"  # any timm model name
    # false; true: the hub's weights (needs the network); or a local weights file / hub download
    # folder (dtrain.methods.pretrained), a state dict of the backbone as timm saves it
    pretrained: bool | str = False
    # imagenet: the backbone's own stem; small: 3x3 stride-1 stem, no max-pool (<= 32 px)
    stem: Literal["imagenet", "small"] = "imagenet"
    projection_hidden: int = 512
    projection_dim: int = 128
    attention_hidden: int = 128
    attention_inputs: Literal["feature", "feature+label", "feature+label+confidence"] = (
        "feature+label+confidence"
    )
    sync_batchnorm: bool = False  # batch statistics over all ranks (several processes, CUDA)


@dataclass
class MethodConfig:
    # CE + NT-Xent + ELR's term, chosen on the main job's tuning seeds (benchmarks/main_job.py);
    # `dtrain train --help` lists the others (dtrain.methods.registry.METHODS)
    name: MethodName = "con_elr"
    group_size: int = 8  # K
    temperature: float = 0.5  # tau of NT-Xent
    mixup_alpha: float = 1.0  # Beta(alpha, alpha) prior; 0 means lam = 0.5
    lambda_iam: float = 1.0
    lambda_con: float = 1.0
    mixup_space: Literal["logit", "feature"] = "logit"  # logit: the exact shortcut of method.md
    mixup_backend: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA
    warmup_epochs: int = 0  # epochs of plain CE (+ contrastive) before the mixup term starts
    gce_q: float = 0.7
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    # None: the nominal noise rate the dataset was prepared with (never its clean labels);
    # required for a dataset without injected noise
    coteaching_forget_rate: float | None = None
    coteaching_ramp_epochs: int = 10
    # ELR (elr, iam_elr): the regulariser's weight and the targets' averaging (the paper's
    # CIFAR-10 values)
    elr_lambda: float = 3.0
    elr_beta: float = 0.7
    # the weight rises to elr_lambda over this many first epochs (a sigmoid-shaped ramp; 0: the
    # paper's constant weight), so that the targets it pulls towards come from a model past chance
    elr_rampup_epochs: int = 0
    # from this epoch on (0: never) the CE term trains each sample towards w y + (1 - w) t: its
    # label where a per-class GMM on the last epoch's losses trusts it, else its ELR target t
    elr_refine_from: int = 0
    # FixMatch's confident-prediction consistency between the two views (methods with the
    # contrastive term; 0: off): its weight, reached over consistency_rampup_epochs as ELR's,
    # and the confidence a first-view prediction needs to become the second view's target
    consistency_lambda: float = 0.0
    consistency_threshold: float = 0.95
    consistency_rampup_epochs: int = 30
    # DivideMix (the paper's CIFAR-10 values; method.warmup_epochs is its CE warm-up): the
    # unlabelled loss weight (ramped up over dividemix_rampup_epochs after the warm-up), the
    # clean probability that keeps a label, the sharpening temperature, the Beta(a, a) of MixMatch
    dividemix_lambda_u: float = 25.0
    dividemix_rampup_epochs: int = 5
    dividemix_threshold: float = 0.5
    dividemix_sharpen: float = 0.5
    dividemix_alpha: float = 4.0
    # global: one GMM over all samples (the paper); per_class: one per given class
    dividemix_divide: Literal["global", "per_class"] = "global"
    score_epochs: int = 5  # mislabel scores average over the last N epochs


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    # per optimiser step, whatever the accumulation
    lr: float = operational(0.05, alters_result=True)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # linear learning-rate warm-up, then cosine to zero
    warmup_epochs: float = operational(1.0, alters_result=True)
    grad_clip: float = operational(5.0, alters_result=True)  # max gradient norm; 0: off


@dataclass
class TrainConfig:
    epochs: int = 40
    seed: int = 0
    run_dir: str = ""  # empty: runs/<method>_seed<seed>
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # micro-batches per optimiser step; the contrastive negatives stay one micro-step's global batch
    grad_accum_steps: int = 1
    # optimiser steps between logs; also the only steps that read values back from the device
    # and see a stop request (a signal), so keep it small enough for the preemption warning
    log_every: int = operational(10)
    progress: bool = operational(True)
    max_nonfinite_steps: int = operational(20)  # stop (with a checkpoint) after this many in a row
    # checkpoint and exit after this many steps in this invocation (0: never)
    stop_after_steps: int = operational(0)
    # mid-epoch checkpoints (beside the one at each epoch end), so that a crash loses at most
    # this much work: every N optimiser steps and/or every M minutes (0: off). Both are checked
    # on log steps only (train.log_every), where the ranks already agree.
    checkpoint_every_steps: int = operational(0)
    checkpoint_every_minutes: float = operational(15.0)
    dist_timeout_s: int = operational(600)  # how long a rank waits for the others
    # a DeepSpeed JSON config (configs/deepspeed/zero{1,2,3}.json) runs the DeepSpeed engine;
    # empty: Accelerate (DDP). "auto" values are filled from this config.
    deepspeed: str = ""
    # which weights become best.pt, chosen without clean labels (dtrain.train.selection)
    select: SelectRule = "ema_last"
    select_window: int = 5  # epochs averaged by noisy_val_smoothed
    # a moving average of the weights, kept beside them and evaluated each epoch, over about
    # this many epochs (dtrain.train.ema); 0: none
    ema_epochs: float = 3.0
    # label clean-up rounds (dtrain.train.rounds): after a round, the samples the ranking
    # suspects most and the model disagrees with are relabelled to its prediction, and the next
    # round trains on the corrected labels; 0: train once
    refine_rounds: int = 0
    refine_init: Literal["scratch", "warm"] = "scratch"  # warm: from the previous round's weights
    # 0: a round's own training proposes its corrections. K >= 2: cross-fitted, a round trains
    # K models, each with one fold's labels hidden, and a sample's label is judged by the model
    # that never saw it (dtrain.train.folds); K + 1 trainings for one round
    refine_folds: int = 0
    # torch.compile the training step (network and losses) in place; evaluation stays eager.
    # true: inductor; or a backend name (aot_eager tells a compile bug from an inductor one).
    # Off until it measures faster (benchmarks/step_breakdown.py)
    compile: bool | str = operational(False)
    # NHWC weights and images: faster convolutions on tensor cores (CUDA); same numbers
    channels_last: bool = operational(False)
    # where metrics go beside metrics.jsonl: any of tensorboard, mlflow, wandb (the last two
    # need `pip install 'dtrain[track]'` and read their own environment variables; docs/trackers.md)
    trackers: list[TrackerName] = operational(["tensorboard"])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # dotted keys the user set (YAML or overrides); not part of the saved config
    explicit_keys: set[str] = field(default_factory=set, repr=False, compare=False)

    def validate(self) -> None:
        """Every value checked before any work; the error names the key, the value and what is
        valid. Coercion (`config_values.coerce`) already enforced each key's type and choices."""
        d, mo, m, o, t = self.data, self.model, self.method, self.optim, self.train
        _check(d.image_size >= 16, "data.image_size", d.image_size, ">= 16")
        _check(d.batch_size >= 2, "data.batch_size", d.batch_size, ">= 2")
        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
        _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, ">= 0 (0: none)")
        _check(d.samples_per_epoch >= 0, "data.samples_per_epoch", d.samples_per_epoch, ">= 0")
        _check(
            not d.resampled or d.samples_per_epoch > 0,
            "data.samples_per_epoch",
            d.samples_per_epoch,
            "> 0 in resampled mode (data.resampled=true)",
        )
        for key in ("projection_hidden", "projection_dim", "attention_hidden"):
            _check(getattr(mo, key) >= 1, f"model.{key}", getattr(mo, key), ">= 1")
        _check(2 <= m.group_size <= 32, "method.group_size", m.group_size, "in 2..32")
        spec = METHODS[m.name]
        if spec.groups:
            _check(
                d.batch_size % m.group_size == 0,
                "method.group_size",
                m.group_size,
                f"a divisor of the per-rank batch data.batch_size={d.batch_size}",
            )
        if spec.pairs_halves:
            _check(d.batch_size % 2 == 0, "data.batch_size", d.batch_size, f"even for {m.name}")
        _check(m.temperature > 0, "method.temperature", m.temperature, "> 0")
        _check(0 < m.gce_q <= 1, "method.gce_q", m.gce_q, "in (0, 1]")
        rate = m.coteaching_forget_rate
        _check(rate is None or 0 <= rate < 1, "method.coteaching_forget_rate", rate, "in [0, 1)")
        _check(m.score_epochs >= 1, "method.score_epochs", m.score_epochs, ">= 1")
        _check(0 <= m.elr_beta < 1, "method.elr_beta", m.elr_beta, "in [0, 1)")
        _check(
            0 < m.consistency_threshold <= 1,
            "method.consistency_threshold",
            m.consistency_threshold,
            "in (0, 1]",
        )
        _check(
            m.consistency_lambda == 0 or (spec.contrastive and m.lambda_con > 0),
            "method.consistency_lambda",
            m.consistency_lambda,
            "0 for a method without the contrastive term's second view (method.lambda_con > 0 "
            "of " + ", ".join(n for n, s in METHODS.items() if s.contrastive) + ")",
        )
        _check(
            0 <= m.dividemix_threshold <= 1,
            "method.dividemix_threshold",
            m.dividemix_threshold,
            "in [0, 1]",
        )
        _check(m.dividemix_sharpen > 0, "method.dividemix_sharpen", m.dividemix_sharpen, "> 0")
        _check(
            m.dividemix_rampup_epochs >= 1,
            "method.dividemix_rampup_epochs",
            m.dividemix_rampup_epochs,
            ">= 1",
        )
        for key in (
            "mixup_alpha",
            "lambda_iam",
            "lambda_con",
            "warmup_epochs",
            "sce_alpha",
            "sce_beta",
            "coteaching_ramp_epochs",
            "elr_lambda",
            "elr_rampup_epochs",
            "elr_refine_from",
            "consistency_lambda",
            "consistency_rampup_epochs",
            "dividemix_lambda_u",
            "dividemix_alpha",
        ):
            _check(getattr(m, key) >= 0, f"method.{key}", getattr(m, key), ">= 0")
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        # SGD runs with Nesterov momentum, which torch refuses without momentum
        _check(0 < o.momentum < 1, "optim.momentum", o.momentum, "in (0, 1)")
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
        _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0 (0: off)")
        _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
        # NumPy takes seeds below 2**32, and each rank seeds with seed + its rank
        _check(0 <= t.seed < 2**31, "train.seed", t.seed, f"in 0..{2**31 - 1}")
        _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, ">= 1")
        _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
        _check(
            t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, ">= 1"
        )
        for key in ("stop_after_steps", "checkpoint_every_steps", "checkpoint_every_minutes"):
            _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), ">= 0 (0: off)")
        _check(t.select_window >= 1, "train.select_window", t.select_window, ">= 1")
        _check(t.ema_epochs >= 0, "train.ema_epochs", t.ema_epochs, ">= 0 (0: none)")
        _check(0 <= t.refine_rounds <= 10, "train.refine_rounds", t.refine_rounds, "in 0..10")
        _check(
            t.refine_folds == 0 or 2 <= t.refine_folds <= 10,
            "train.refine_folds",
            t.refine_folds,
            "0 (no cross-fitting) or in 2..10",
        )
        if t.refine_folds:
            self._check_folds()
        _check(t.dist_timeout_s >= 1, "train.dist_timeout_s", t.dist_timeout_s, ">= 1")
        _check(
            not self.run_path.exists() or self.run_path.is_dir(),
            "train.run_dir",
            str(self.run_path),
            "a folder (this is a file)",
        )
        _check(
            not t.deepspeed or Path(t.deepspeed).is_file(),
            "train.deepspeed",
            t.deepspeed,
            "an existing DeepSpeed JSON file",
        )
        _check(
            not (t.channels_last and t.deepspeed),
            "train.channels_last",
            t.channels_last,
            "false under DeepSpeed (train.deepspeed), whose flat weight buffers drop the layout",
        )
        _check_trackers_installed(t.trackers)
        _check_backbone(mo.backbone)  # these last: they import timm and torch
        if isinstance(t.compile, str):
            _check_compile_backend(t.compile)
        if isinstance(mo.pretrained, str):
            from dtrain.methods.pretrained import checked_weights_file

            checked_weights_file(mo.pretrained, mo.backbone)

    def _check_folds(self) -> None:
        """What a cross-fitted round (train.refine_folds) needs: a round to fit, a method that
        trains without a label, and no step that reads the hidden labels."""
        t, m = self.train, self.method
        unlabelled = [name for name, spec in METHODS.items() if spec.unlabelled]
        _check(t.refine_rounds >= 1, "train.refine_rounds", t.refine_rounds, ">= 1 with folds")
        _check(
            METHODS[m.name].unlabelled,
            "method.name",
            m.name,
            f"one that trains on hidden labels with train.refine_folds ({', '.join(unlabelled)})",
        )
        _check(
            m.elr_refine_from == 0,
            "method.elr_refine_from",
            m.elr_refine_from,
            "0 with train.refine_folds (its division reads every label)",
        )
        _check(
            t.refine_init == "scratch",
            "train.refine_init",
            t.refine_init,
            "scratch with train.refine_folds (no one fold's weights to start from)",
        )

    @property
    def run_path(self) -> Path:
        """The run folder: train.run_dir, or runs/<method>_seed<seed>."""
        return Path(self.train.run_dir or f"runs/{self.method.name}_seed{self.train.seed}")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.pop("explicit_keys")
        return values

    def identity(self) -> dict:
        """The config less its operational keys: what a resumed run must share."""
        return self._without(operational_keys())

    def result_identity(self) -> dict:
        """The config less the keys that do not change the trained weights (operational ones
        without `alters_result`, and where the run is written): what a finished clean-up round
        must share to be reused."""
        return self._without([*operational_keys(alters_result=False), "train.run_dir"])

    def _without(self, keys: list[str]) -> dict:
        values = self.to_dict()
        for key in keys:
            section, name = key.split(".")
            values[section].pop(name)
        return values


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {expected}")


def _check_compile_backend(name: str) -> None:
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if name not in backends:
        raise ConfigError(
            f"train.compile={name!r} is invalid: must be true, false or a torch.compile backend "
            f"({', '.join(backends)})"
        )


def _check_trackers_installed(names: list[str]) -> None:
    """Refuse, in one line, a tracker whose client is missing (dtrain.train.trackers)."""
    for name in names:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"train.trackers={name!r} needs the {name} client, which is not installed: "
                "pip install 'dtrain[track]'"
            )


def _check_backbone(name: str) -> None:
    """A timm model name (`resnet18`, `resnet18.a1_in1k`), or a hub / local one (`hf-hub:...`,
    which timm resolves when it builds it)."""
    import timm

    if ":" in name or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(
        f"model.backbone={name!r} is invalid: must be a timm model name (timm.list_models()){hint}"
    )


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in _fields(Config)}


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "explicit_keys"]


def config_keys() -> list[str]:
    """Every leaf key, dotted: `optim.lr`, ..."""
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in _fields(cls)]


def operational_keys(alters_result: bool | None = None) -> list[str]:
    """Keys a resumed run may change; `alters_result` True/False: only those that do/don't
    change the trained weights."""
    return [
        f"{s}.{f.name}"
        for s, cls in _sections().items()
        for f in _fields(cls)
        if f.metadata.get("operational") and alters_result in (None, f.metadata["alters_result"])
    ]


def _unknown(key: str, valid: list[str], what: str = "key") -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a bare leaf name: `lr` -> `optim.lr`
        close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown config {what} {key!r}{hint}")


def _not_a_section(section: str, value: Any) -> ConfigError:
    keys = ", ".join(f"{section}.{f.name}" for f in _fields(_sections()[section])[:3])
    return ConfigError(
        f"{section}={value!r} is invalid: {section} is a section of keys ({keys}, ...), not a value"
    )


def _apply(config: Config, values: dict, valid: list[str]) -> set[str]:
    """Set `section: {key: value}` values on `config`; returns the dotted keys set."""
    sections = _sections()
    done = set()
    for section, entries in values.items():
        if section not in sections:
            raise _unknown(section, list(sections), "section")
        if entries is None:  # a YAML section whose keys are all commented out
            continue
        if not isinstance(entries, dict):
            raise _not_a_section(section, entries)
        node = getattr(config, section)
        hints = typing.get_type_hints(sections[section])
        for name, value in entries.items():
            key = f"{section}.{name}"
            if key not in valid:
                raise _unknown(key, valid)
            setattr(node, name, coerce(value, hints[name], key))
            done.add(key)
    return done


def set_key(config: Config, key: str, value: Any) -> None:
    """One dotted key set as if written in YAML (coerced and checked; not marked explicit)."""
    section, name = key.split(".")
    _apply(config, {section: {name: value}}, config_keys())


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides, then what the method
    implies for keys left unset (dtrain.methods.registry); not yet validated."""
    config = Config()
    valid = config_keys()
    if path:
        values = read_yaml_mapping(path, "config file")
        config.explicit_keys |= _apply(config, values, valid)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        if key in _sections():
            raise _not_a_section(key, value)
        if key not in valid:
            raise _unknown(key, valid)
        section, name = key.split(".")
        config.explicit_keys |= _apply(config, {section: {name: value}}, valid)
    apply_method_implies(config)
    return config


def apply_method_implies(config: Config) -> None:
    """What the method implies (dtrain.methods.registry), for the keys the user left unset."""
    for key, value in METHODS[config.method.name].implies.items():
        if key not in config.explicit_keys:
            set_key(config, key, value)


def config_from_dict(values: dict) -> Config:
    """A saved config (config.yaml, a checkpoint): every key counts as set by the user."""
    config = Config()
    config.explicit_keys = _apply(config, values, config_keys())
    return config


def save_config(config: Config, path: Path) -> None:
    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

"""How a search runs: one typed dataclass, read from the search file's `search:` section and then
from `dtrain tune`'s flags (each field is a flag), checked before Ray starts."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dtrain.config import Config, load_config, read_yaml_mapping, set_key
from dtrain.config_values import option
from dtrain.errors import ConfigError
from dtrain.train.metrics import METRIC_NAMES
from dtrain.tune.space import Dimension, parse_space

# what the objective may average: the val metrics on the labels as shipped, of the net or of
# its weight average (`val_ema_*`, the model a run hands over under an EMA rule), or (where
# the dataset keeps them, e.g. to study the search itself) on the clean labels; or the train loss
OBJECTIVE_METRICS = tuple(
    f"val_{weights}{labels}{m}"
    for weights in ("", "ema_")
    for labels in ("", "clean_")
    for m in METRIC_NAMES
) + ("train_loss", "train_accuracy")
# metrics where lower is better: the objective's mode unless the user gives one
LOWER_IS_BETTER = ("ece", "loss")


def mode_of(metric: str) -> str:
    """The mode a metric is optimised in: losses and calibration error down, the rest up."""
    return "min" if metric.endswith(LOWER_IS_BETTER) else "max"


@dataclass
class SearchSettings:
    algorithm: Literal["random", "grid", "tpe"] = option(
        "random", "random sampling, a grid over the space, or Optuna's TPE (needs optuna)"
    )
    num_samples: int = option(
        0, "trials to run (0: 12); grid: how many times the whole grid is run (0: once)"
    )
    grid_points: int = option(3, "grid: values tried per range (log-spaced for loguniform)")
    max_concurrent: int = option(2, "trials running at once")
    scheduler: Literal["asha", "none"] = option("asha", "ASHA stops weak trials early; none: never")
    grace_period: int = option(2, "ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: float = option(2.0, "ASHA: keep 1/this of the trials at each rung")
    metric: str = option("val_accuracy", "epoch record key the objective averages")
    mode: Literal["auto", "max", "min"] = option(
        "auto", "whether a higher metric is better (auto: min for losses and ECE, else max)"
    )
    window: int = option(3, "objective: the metric averaged over this many last epochs")
    workers_per_trial: int = option(1, "processes per trial (2+: Ray Train's TorchTrainer)")
    cpus_per_trial: float = option(1.0, "CPUs per worker process")
    gpus_per_trial: float = option(0.0, "GPUs per worker process")
    max_failures: int = option(1, "retries of a trial that fails, from its last checkpoint")
    storage_path: str = option("tune_results", "folder of all searches (a shared one on a cluster)")
    name: str = option(
        "", "this search's folder under --storage-path", default_help="the file's name"
    )
    seed: int = option(0, "seed of the sampler (the trials' own seed is train.seed)")
    address: str = option("", "a Ray cluster to join ('auto': the one this node belongs to)")
    object_store_mb: int = option(
        256, "object store of a local Ray (trials pass no data through it)"
    )

    def validate(self) -> None:
        if self.num_samples == 0:
            self.num_samples = 1 if self.algorithm == "grid" else 12
        checks = {
            "num_samples": self.num_samples >= 1,
            "grid_points": self.grid_points >= 2,
            "max_concurrent": self.max_concurrent >= 1,
            "grace_period": self.grace_period >= 1,
            "reduction_factor": self.reduction_factor > 1,
            "window": self.window >= 1,
            "workers_per_trial": self.workers_per_trial >= 1,
            "cpus_per_trial": self.cpus_per_trial > 0,
            "gpus_per_trial": self.gpus_per_trial >= 0,
            "max_failures": self.max_failures >= 0,
            "object_store_mb": self.object_store_mb >= 64,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"search.{key}={getattr(self, key)!r} is invalid")
        if self.metric not in OBJECTIVE_METRICS:
            close = difflib.get_close_matches(self.metric, OBJECTIVE_METRICS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"search.metric={self.metric!r} is not an epoch metric{hint} "
                f"(one of {', '.join(OBJECTIVE_METRICS)})"
            )
        if self.mode == "auto":
            self.mode = mode_of(self.metric)
        if self.algorithm == "tpe":
            try:
                import optuna  # noqa: F401
            except ImportError as err:
                raise ConfigError("search.algorithm=tpe needs optuna: pip install optuna") from err


def _absolute_paths(config: Config) -> None:
    """Trials run in Ray's own working folders (and on other nodes): every path they read must
    be absolute. The embedded set is prepared here, once, not by each trial."""
    from dtrain.prepare.data_folder import resolve_data_dir

    set_key(config, "data.path", str(resolve_data_dir(config.data.path, progress=True).resolve()))
    if config.train.deepspeed:
        set_key(config, "train.deepspeed", str(Path(config.train.deepspeed).resolve()))
    if isinstance(config.model.pretrained, str):  # local weights
        set_key(config, "model.pretrained", str(Path(config.model.pretrained).resolve()))


@dataclass
class Search:
    """Everything a search needs, resolved: saved as `search.yaml` in its folder so that
    `--resume` can check it is continuing the same search."""

    settings: SearchSettings
    space: list[Dimension]
    base: Config
    source: str

    @property
    def folder(self) -> Path:
        return Path(self.settings.storage_path).resolve() / self.settings.name

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "search": dataclasses.asdict(self.settings),
            "space": {d.key: {d.kind: list(d.values)} for d in self.space},
            "base": self.base.to_dict(),
        }


def load_search(
    path: str | Path,
    config_path: str | None,
    overrides: list[str],
    flags: dict[str, Any],
) -> Search:
    """The search file (`space:`, optionally `search:` and `config:`), the base dtrain config (as
    for `dtrain train`: `--config`, else the file's `config:`, a path relative to the file, so
    that a search of the mixup's knobs trains a method that has one) and the flags given on the
    command line (they win)."""
    path = Path(path)
    values = read_yaml_mapping(path, "search file")
    unknown = set(values) - {"space", "search", "config"}
    if unknown:
        raise ConfigError(
            f"search file {path}: only `space:`, `search:` and `config:` are read; got {unknown}"
        )
    if config_path is None and values.get("config"):
        config_path = str(path.parent / str(values["config"]))
        if not Path(config_path).is_file():
            raise ConfigError(f"search file {path}: config: {values['config']} is not a file")
    settings = SearchSettings()
    names = {f.name for f in dataclasses.fields(SearchSettings)}
    given = {**(values.get("search") or {}), **{k: v for k, v in flags.items() if v is not None}}
    for key, value in given.items():
        if key not in names:
            raise ConfigError(f"search file {path}: unknown search setting {key!r}")
        setattr(settings, key, value)
    settings.name = settings.name or path.stem
    settings.validate()
    base = load_config(config_path, overrides)
    base.validate()
    _one_round(base)
    space = parse_space(values.get("space"), base, str(path))
    for key in ("train.refine_rounds", "train.refine_folds"):
        if any(d.key == key for d in space):
            raise ConfigError(f"search file {path}: {key} cannot be searched")
    _absolute_paths(base)  # last: it may prepare the embedded set
    if settings.algorithm == "tpe" and settings.num_samples < 2:
        raise ConfigError("search.algorithm=tpe needs search.num_samples >= 2")
    search = Search(settings, space, base, str(path))
    _bound_grace(search)
    return search


def _bound_grace(search: Search) -> None:
    """ASHA refuses a grace period past the last epoch (Ray's `grace_period must be <= max_t`);
    as no trial runs longer, the grace is bounded by the epochs, with a note."""
    s, most = search.settings, max_epochs_of(search)
    if s.scheduler == "asha" and s.grace_period > most:
        print(f"tune: search.grace_period={s.grace_period} cut to the {most} epoch(s) trials run")
        s.grace_period = most


def _one_round(base: Config) -> None:
    """A trial is one round of training: its epochs are what the scheduler compares. The
    label clean-up rounds (train.refine_rounds) belong to the final training of the config the
    search finds, so a search turns them off unless asked for them, which it refuses."""
    if base.train.refine_rounds and "train.refine_rounds" in base.explicit_keys:
        raise ConfigError(
            "train.refine_rounds: a search trial trains one round (drop the key, then train the "
            "best trial's config with rounds)"
        )
    base.train.refine_rounds = base.train.refine_folds = 0


def max_epochs_of(search: Search) -> int:
    """The most epochs any trial runs: the base config's, or the most a searched train.epochs
    gives (randint's upper bound is exclusive)."""
    for d in search.space:
        if d.key == "train.epochs":
            return d.values[1] - 1 if d.kind == "randint" else int(max(d.values))
    return search.base.train.epochs


def epochs_of(base_epochs: int, values: dict) -> int:
    """The epochs of the trial with these sampled values: a trial that ran them all is done,
    whatever the others run."""
    return int(values.get("train.epochs", base_epochs))

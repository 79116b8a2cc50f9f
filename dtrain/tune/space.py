"""A search space as users write it (`tuning/*.yaml`, section `space:`), checked against the
dtrain config before any trial starts, and turned into Ray Tune domains.

    method.group_size: {choice: [2, 4, 8, 16]}
    method.temperature: {loguniform: [0.05, 1.0]}
    optim.lr: {uniform: [0.01, 0.1]}

Each key is a dtrain config key; each value one of `choice` (a list), `uniform` or `loguniform`
(`[low, high]`), or `randint` (`[low, high)`). Group sizes that do not divide the per-rank
batch are dropped with a note, as the method needs whole groups."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtrain.config import Config, apply_method_implies, config_keys, set_key
from dtrain.errors import ConfigError
from dtrain.methods.registry import METHODS

KINDS = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: its kind and its values (a choice) or bounds (a range)."""

    key: str
    kind: str
    values: tuple

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform"

    def grid(self, points: int) -> list:
        """The values a grid search tries: a choice's values, or `points` spread over a range
        (log-spaced for `loguniform`)."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return sorted({int(v) for v in np.linspace(low, high - 1, points).round()})
        spread = np.geomspace if self.is_log else np.linspace
        return [float(v) for v in spread(low, high, points)]

    def to_ray(self, grid_points: int | None) -> Any:
        """The Ray Tune domain; a grid search when `grid_points` is given."""
        from ray import tune

        if grid_points is not None:
            return tune.grid_search(self.grid(grid_points))
        low_high = self.values
        return {
            "choice": lambda: tune.choice(list(self.values)),
            "uniform": lambda: tune.uniform(*low_high),
            "loguniform": lambda: tune.loguniform(*low_high),
            "randint": lambda: tune.randint(*low_high),
        }[self.kind]()


def _check_value(base: Config, key: str, value: Any) -> None:
    """Refuse, before any trial, a value the trial's config would refuse."""
    trial = copy.deepcopy(base)
    set_key(trial, key, value)
    trial.explicit_keys.add(key)
    apply_method_implies(trial)
    trial.validate()


def parse_dimension(key: str, spec: Any, base: Config, where: str) -> Dimension | None:
    """One `key: {kind: values}` entry, checked against the config; None when a choice keeps no
    value (reported by the caller)."""
    if key not in config_keys():
        set_key(Config(), key, None)  # raises the config's own "unknown key, did you mean"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(
            f"{where}: {key} must be one of {{choice: [...]}}, {{uniform: [low, high]}}, "
            f"{{loguniform: [low, high]}}, {{randint: [low, high]}}; got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key}.{kind} must be a non-empty list; got {values!r}")
    if kind == "choice":
        if key == "method.group_size" and METHODS[base.method.name].groups:
            kept = [k for k in values if isinstance(k, int) and base.data.batch_size % k == 0]
            dropped = sorted(set(values) - set(kept))
            if dropped:
                print(
                    f"tune: method.group_size {dropped} dropped: they do not divide the "
                    f"per-rank batch data.batch_size={base.data.batch_size}"
                )
            values = kept
            if not values:
                return None
        for value in values:
            try:
                _check_value(base, key, value)
            except ConfigError as err:
                raise ConfigError(f"{where}: {key} choice {value!r}: {err}") from err
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
        raise ConfigError(f"{where}: {key}.{kind} needs [low, high]; got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: {key}.{kind} needs low < high; got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {key}.loguniform needs low > 0; got {low}")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: {key}.randint needs integers; got {values!r}")
    for value in (low, high - 1 if kind == "randint" else high):
        try:
            _check_value(base, key, value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {key} bound {value!r}: {err}") from err
    return Dimension(key, kind, (low, high))


def parse_space(spec: Any, base: Config, where: str) -> list[Dimension]:
    """All dimensions of a `space:` mapping (at least one)."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: `space:` must map config keys to {{kind: values}}")
    dimensions = []
    for key, entry in spec.items():
        dimension = parse_dimension(str(key), entry, base, where)
        if dimension is None:
            raise ConfigError(f"{where}: {key} has no value left to try")
        dimensions.append(dimension)
    return dimensions


def grid_size(dimensions: list[Dimension], points: int) -> int:
    return math.prod(len(d.grid(points)) for d in dimensions)

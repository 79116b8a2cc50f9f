"""Which epoch's weights become `best.pt`, chosen without clean labels (`train.select`).

At 40% symmetric noise on two classes, accuracy on noisy val labels moves only 0.2 points per
point of clean accuracy, so its sampling noise swamps the signal; with instance-dependent noise
the wrong val labels sit on the hard images, and an early, near-constant model agrees with them
best. The rules here are measured against each other in `benchmarks/study.py` (docs/selection.md,
docs/results.md); each returns, for a run's epoch history, the score of its newest epoch (higher is
better), so the trainer can decide online, and `picks` replays a rule over a finished history
for the report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Rule:
    weights: Literal["raw", "ema"]
    metric: str | None  # the epoch record's key the rule maximises; None: the newest epoch
    smoothed: bool = False  # mean over the last `train.select_window` epochs
    newer_on_tie: bool = True
    describe: str = ""


RULES: dict[str, Rule] = {
    "last": Rule("raw", None, describe="the last epoch's weights"),
    "ema_last": Rule("ema", None, describe="the weight average (EMA) at the last epoch"),
    "noisy_val": Rule(
        "raw",
        "val_accuracy",
        newer_on_tie=False,
        describe="the epoch with the best accuracy on the val labels as shipped",
    ),
    "noisy_val_smoothed": Rule(
        "raw",
        "val_accuracy",
        smoothed=True,
        describe="the epoch ending the best window of mean val accuracy (labels as shipped)",
    ),
    "ema_noisy_val": Rule(
        "ema",
        "val_ema_accuracy",
        describe="the weight average at the epoch its val accuracy (labels as shipped) is best",
    ),
}


def effective_rule(
    rule: str, has_ema: bool, has_val: bool, epochs: int | None = None, window: int = 1
) -> str:
    """The rule a run can apply: without a val split the val rules become the last epoch's,
    without a weight average (ZeRO-3 partitions the weights) the EMA ones their raw twins, and
    a smoothed rule in a run of fewer than `window` epochs (no full window) the last epoch's."""
    if not has_ema and RULES[rule].weights == "ema":
        rule = {"ema_last": "last", "ema_noisy_val": "noisy_val"}[rule]
    if not has_val and RULES[rule].metric is not None:
        rule = "ema_last" if RULES[rule].weights == "ema" else "last"
    if RULES[rule].smoothed and epochs is not None and epochs < window:
        rule = "last"
    return rule


def score(rule: str, history: list[dict], window: int) -> float:
    """The newest epoch's score under `rule` (its value for the newest epoch in `history`)."""
    spec = RULES[rule]
    if spec.metric is None:
        return float(len(history))
    # an epoch logged before the run kept an average has no EMA accuracy: never picked
    values = [record.get(spec.metric, -math.inf) for record in history]
    if spec.smoothed:
        if len(values) < window:  # only full windows compete: one early epoch is no mean
            return -math.inf
        return sum(values[-window:]) / window
    return values[-1]


START = -1.0  # below every score (accuracies, epoch counts): the first epoch always improves


def improves(rule: str, new: float, best: float) -> bool:
    return new > best or (RULES[rule].newer_on_tie and new == best)


def picks(rule: str, history: list[dict], window: int) -> int | None:
    """The 1-based epoch `rule` selects in a finished history (as the trainer did online), or
    None where no epoch ever scored (e.g. no epoch had an EMA val accuracy)."""
    best, chosen = START, 0
    for end in range(1, len(history) + 1):
        value = score(rule, history[:end], window)
        if improves(rule, value, best):
            best, chosen = value, end
    return chosen or None


def candidates(history: list[dict], window: int, has_ema: bool) -> list[dict]:
    """What each rule would have picked in this run: the epoch, its weights, and the val
    accuracy there against the labels as shipped and, where known, the clean ones (all None
    for a rule that picked no epoch)."""
    rows = []
    has_val = bool(history) and "val_accuracy" in history[-1]
    for name in RULES:
        if effective_rule(name, has_ema, has_val, len(history), window) != name:
            continue
        epoch = picks(name, history, window)
        record = history[epoch - 1] if epoch is not None else {}
        prefix = "val_ema_" if RULES[name].weights == "ema" else "val_"
        rows.append(
            {
                "rule": name,
                "epoch": epoch,
                "weights": RULES[name].weights,
                "val_accuracy": record.get(f"{prefix}accuracy"),
                "val_clean_accuracy": record.get(f"{prefix}clean_accuracy"),
            }
        )
    return rows

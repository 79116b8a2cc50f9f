"""Model selection without clean labels (`train.select`) and the corrections a label clean-up
round proposes, on made-up histories and scores."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from dtrain.train import selection
from dtrain.train.label_scores import SCHEMA
from dtrain.train.rounds import propose


def history(raw: list[float], ema: list[float]) -> list[dict]:
    return [
        {
            "epoch": i + 1,
            "val_accuracy": r,
            "val_ema_accuracy": e,
            "val_clean_accuracy": 0.5,
            "val_ema_clean_accuracy": 0.6,
        }
        for i, (r, e) in enumerate(zip(raw, ema, strict=True))
    ]


RAW = [0.60, 0.70, 0.55, 0.65, 0.70, 0.66, 0.64]
EMA = [0.50, 0.60, 0.62, 0.66, 0.66, 0.63, 0.61]


@pytest.mark.parametrize(
    ("rule", "epoch"),
    [
        ("last", 7),
        ("ema_last", 7),
        ("noisy_val", 2),  # the first of the tied best: the classic rule
        # windows of 3: (.60+.70+.55)/3=.617, (.70+.55+.65)/3=.633, (.55+.65+.70)/3=.633,
        # (.65+.70+.66)/3=.670, (.70+.66+.64)/3=.667: the window ending at epoch 6
        ("noisy_val_smoothed", 6),
        ("ema_noisy_val", 5),  # tied at .66 with epoch 4: the newer one
    ],
)
def test_each_rule_picks_its_epoch(rule, epoch):
    assert selection.picks(rule, history(RAW, EMA), window=3) == epoch


def test_only_full_windows_compete():
    # the history: a partial window would let epoch 1 (.70 alone) win
    raw = [0.70, 0.60, 0.62, 0.64, 0.66, 0.68, 0.69, 0.69, 0.69, 0.69]
    assert selection.picks("noisy_val_smoothed", history(raw, raw), window=5) == 10
    assert selection.score("noisy_val_smoothed", history(raw, raw)[:4], 5) == -math.inf


def test_a_rule_that_never_scores_picks_no_epoch():
    """An EMA rule over a history without the average's accuracy (e.g. logged before the run
    kept one) picks nothing, and says so, instead of reporting the last epoch as its own."""
    records = [{"epoch": e, "val_accuracy": 0.5} for e in (1, 2, 3)]
    assert selection.picks("ema_noisy_val", records, 3) is None
    rows = {r["rule"]: r for r in selection.candidates(records, 3, has_ema=True)}
    assert rows["ema_noisy_val"]["epoch"] is None
    assert rows["ema_noisy_val"]["val_accuracy"] is None
    assert rows["noisy_val"]["epoch"] == 1


def test_rules_fall_back_where_the_run_cannot_apply_them():
    assert selection.effective_rule("ema_last", has_ema=False, has_val=True) == "last"
    assert selection.effective_rule("ema_noisy_val", has_ema=False, has_val=True) == "noisy_val"
    assert selection.effective_rule("ema_noisy_val", has_ema=True, has_val=False) == "ema_last"
    assert selection.effective_rule("noisy_val_smoothed", has_ema=True, has_val=False) == "last"
    assert selection.effective_rule("noisy_val", has_ema=True, has_val=True) == "noisy_val"
    # no full window in the run: the last epoch's weights, as without a val split
    assert selection.effective_rule("noisy_val_smoothed", True, True, epochs=4, window=5) == "last"
    assert selection.effective_rule("noisy_val_smoothed", True, True, epochs=5, window=5) == (
        "noisy_val_smoothed"
    )


def test_candidates_report_each_rule_with_the_clean_numbers_at_its_pick():
    rows = {r["rule"]: r for r in selection.candidates(history(RAW, EMA), 3, has_ema=True)}
    assert set(rows) == set(selection.RULES)
    assert rows["noisy_val"] == {
        "rule": "noisy_val",
        "epoch": 2,
        "weights": "raw",
        "val_accuracy": 0.70,
        "val_clean_accuracy": 0.5,
    }
    assert rows["ema_last"]["val_clean_accuracy"] == 0.6
    without_ema = selection.candidates(history(RAW, EMA), 3, has_ema=False)
    assert {r["rule"] for r in without_ema} == {"last", "noisy_val", "noisy_val_smoothed"}


def row(key: str, label: int, predicted: int, loss: float, noisy: bool = False, count=1) -> dict:
    values = (key, label, noisy, predicted, loss * count, count, 0.0, 0)
    return dict(zip(SCHEMA.names, values, strict=True))


def scores(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def test_a_round_relabels_the_top_q_suspects_the_model_disagrees_with():
    rows = scores(
        row("a", 0, 1, 5.0, noisy=True),  # most suspicious, disagrees: corrected
        row("b", 1, 1, 4.0),  # suspicious but agreed with: kept
        row("c", 0, 1, 3.0, noisy=True),  # disagrees, third: inside q = 3/7
        row("d", 1, 0, 0.2),  # disagrees but trusted (low loss): outside the top q
        row("e", 0, 0, 0.1),
        row("f", 1, 1, 0.1),
        row("g", 0, 0, 0.1),
        row("h", 1, 0, 0.0, count=0),  # never scored: left out
    )
    corrections = propose(rows)
    assert [(c["key"], c["old"], c["new"], c["rank"]) for c in corrections] == [
        ("a", 0, 1, 1),
        ("c", 0, 1, 3),
    ]
    assert [c["was_wrong"] for c in corrections] == [True, True]
    assert corrections[0]["suspicion"] == 5.0
    assert propose(scores(row("x", 0, 0, 1.0), row("y", 1, 1, 2.0))) == []  # no disagreement
    assert propose(scores()) == []

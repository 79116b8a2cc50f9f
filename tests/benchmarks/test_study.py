"""The study's cleanlab anchor scoring (benchmarks/cleanlab_anchor.py), on made-up predictions:
the detection numbers it reports, and cleanlab itself (an optional extra that setup.sh installs)
finding flipped labels; and the study's report (benchmarks/study_report.py): what its ± means,
and its tables rewritten from the committed runs.parquet."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from cleanlab_anchor import _detection  # noqa: E402
from study_cells import CEILING, TUNING_SEEDS, compute_matched  # noqa: E402
from study_report import rows_from_parquet, rule_table, write_report, write_tables  # noqa: E402

from dtrain.train.selection import RULES  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "study"


def test_detection_reports_auroc_and_precision_at_the_true_count():
    truth = np.array([True, True, False, False, False])
    good = _detection(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), truth)
    assert good == {"auroc": 1.0, "precision_at_true_count": 1.0}
    inverted = _detection(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), truth)
    assert inverted == {"auroc": 0.0, "precision_at_true_count": 0.0}


def test_cleanlab_finds_the_labels_its_predictions_contradict():
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 2, 200)
    probs = np.where(clean[:, None] == np.arange(2), 0.9, 0.1)
    labels = clean.copy()
    flipped = rng.choice(200, 40, replace=False)
    labels[flipped] = 1 - labels[flipped]
    issues = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    assert set(np.flatnonzero(issues)) == set(flipped)


def rule_rows(noise: str, method_acc: dict[str, float], seeds: list[int]) -> list[dict]:
    """Runs whose every rule scores the method's accuracy, +-0.01 between seeds."""
    rows = []
    for method, acc in method_acc.items():
        for seed in seeds:
            value = acc + 0.01 * (seed - 1)
            row = {"noise": noise, "method": method, "seed": seed}
            row |= {f"rule_{rule}_acc": value for rule in RULES}
            rows.append(row)
    return rows


def test_the_rule_table_spread_is_between_seeds_not_between_methods():
    """Methods 0.3 apart, seeds 0.01 apart: the ± says how much a rule's number moves with the
    seed, so it is 0.01, not the methods' spread (0.16 when the 6 runs are pooled)."""
    rows = rule_rows("sym0.4", {"ce": 0.6, "iam": 0.9}, [0, 1, 2])
    rows += rule_rows("sym0.2", {"ce": 0.6, "iam": 0.9}, [1])
    text, stats = rule_table(rows)
    mean, spread, runs = stats["last/sym0.4"]["acc"]
    assert (mean, spread, runs) == pytest.approx((0.75, 0.01, 6))
    assert "sym0.4 (2 methods x 3 seeds)" in text and "sym0.2 (2 methods x 1 seed)" in text
    last = next(line for line in text.splitlines() if line.startswith("| last |")).rstrip(" |")
    assert last.split(" | ")[1:3] == ["0.750", "0.000"]  # one seed: no spread to show
    assert last.split(" | ")[3:5] == ["0.750 ± 0.010", "0.000 ± 0.000"]


def test_the_study_tables_come_back_from_runs_parquet(tmp_path):
    """study.md can be rewritten from the committed runs.parquet alone (no run folders)."""
    rows = rows_from_parquet(RESULTS / "runs.parquet")
    assert len(rows) >= 82 and all("selected_acc" in r for r in rows)
    summary = write_tables(rows, [], "ema_last", tmp_path)
    text = (tmp_path / "study.md").read_text()
    assert summary["runs"] == len(rows)
    assert "**sym0.4**, clean test accuracy (mean ± std over seeds)" in text
    methods = len({r["method"] for r in rows if r["noise"] == "sym0.4" and "rule_last_acc" in r})
    assert f"sym0.4 ({methods} methods x 3 seeds): acc" in text


def study_row(noise: str, method: str, seed: int, acc: float) -> dict:
    return {
        "noise": noise,
        "method": method,
        "seed": seed,
        "wall_seconds": 1.0,
        "select": "ema_last",
        "selected_acc": acc,
        "selected_bacc": acc,
        "last_acc": acc,
        "last_bacc": acc,
        "ema_last_acc": acc,
        "auroc_loss": 0.9,
    }


def test_each_method_is_shown_against_the_ceiling_and_on_the_report_seeds_alone(tmp_path):
    rows = [{**study_row("sym0.4", CEILING, s, 0.9), "auroc_loss": math.nan} for s in (0, 1, 2)]
    rows += [
        {**study_row("sym0.4", "iam", s, acc), "val_clean_acc": acc - 0.05}
        for s, acc in ((0, 0.9), (1, 0.8), (2, 0.7))
    ]
    write_tables(rows, [], "ema_last", tmp_path)
    lines = (tmp_path / "study.md").read_text().splitlines()
    iam = next(line for line in lines if line.startswith("| iam |")).split(" | ")
    # val on the tuning seeds 0 and 1 (0.85, 0.75): 0.8 ± 0.071; test on all seeds 0.8 ± 0.1; seed 2
    # only 0.7; 0.8 - 0.9
    assert TUNING_SEEDS == (0, 1)
    assert iam[2:6] == ["0.800 ± 0.071", "0.800 ± 0.100", "0.700", "-0.100"]
    ceiling = next(line for line in lines if line.startswith(f"| {CEILING} |")).split(" | ")
    assert ceiling[5] == "+0.000"


def test_a_report_keeps_the_recorded_runs_whose_folders_are_gone(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    out.mkdir()
    recorded = [study_row("sym0.4", "iam", s, 0.8) for s in (0, 1)]
    pq.write_table(pa.Table.from_pylist(recorded), out / "runs.parquet")
    (tmp_path / "runs").mkdir()
    summary = write_report(tmp_path / "runs", "ema_last", out)
    assert summary["runs"] == 2
    assert len(rows_from_parquet(out / "runs.parquet")) == 2


def test_the_per_method_overrides_follow_the_budget():
    assert compute_matched("dividemix", 12) == ["train.epochs=6", "method.warmup_epochs=3"]
    assert compute_matched("con_elr", 12) == ["method.elr_rampup_epochs=9"]
    assert compute_matched("con_elr", 40) == ["method.elr_rampup_epochs=30"]  # the main job's
    assert compute_matched("iam", 12) == []

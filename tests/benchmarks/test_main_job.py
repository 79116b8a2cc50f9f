"""The main job's protocol (benchmarks/main_job.py) on planted finished runs: the default is
chosen by the tuning seeds' clean val accuracy, never the ceiling; only the chosen one, the
always-reported rows and candidates with earlier report runs are read on the report seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import main_job  # noqa: E402

# val accuracy on the tuning seeds: the ceiling is best, but never a candidate to choose
VAL = {"iam": 0.78, "iam_elr": 0.85, "iam_elr_ramp20": 0.88, "ceiling": 0.95}


def _plant(runs: Path, name: str, seed: int, val: float, test: float) -> None:
    run = runs / name / f"seed{seed}"
    run.mkdir(parents=True)
    summary = {
        "selection": {
            "rule": "ema_last",
            "candidates": [
                {"rule": "last", "val_clean_accuracy": 0.0},
                {"rule": "ema_last", "val_clean_accuracy": val},
            ],
        },
        "test_best": {"clean_accuracy": test},
        "test_last": {"clean_accuracy": test - 0.01},
        "mislabel_auroc": {"loss": 0.9},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "wall.json").write_text(json.dumps({"wall_s": 120.0}))


@pytest.fixture
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    for name, val in VAL.items():
        for seed in main_job.TUNING_SEEDS:
            _plant(runs, name, seed, val + seed * 0.01, 0.0)
    # the report seeds of the chosen one, the always-reported rows, and an earlier choice
    for name in ("iam_elr_ramp20", *main_job.ALWAYS_REPORTED, "iam_elr"):
        for seed in main_job.REPORT_SEEDS:
            _plant(runs, name, seed, 0.0, VAL[name] - 0.02 + seed * 0.01)
    return runs


def test_the_best_tuning_mean_is_chosen_and_read_on_the_report_seeds_only(runs, tmp_path):
    out = tmp_path / "main_job.json"
    main_job.main(["--candidates", *VAL, "--runs", str(runs), "--no-train", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["chosen"] == "iam_elr_ramp20"
    summary = {name: r["summary"] for name, r in result["results"].items()}
    assert summary["iam_elr_ramp20"]["val_clean_mean"] == pytest.approx(0.885)
    assert summary["iam_elr_ramp20"]["test_clean_mean"] == pytest.approx(0.885)  # 0.88, 0.89
    assert summary["ceiling"]["test_clean_mean"] == pytest.approx(0.955)
    assert summary["iam_elr"]["test_clean_mean"] == pytest.approx(0.855)  # run earlier, shown
    assert summary["iam_elr"]["wall_s_mean_of_timed"] == 120.0
    assert set(result["results"]) == set(VAL)
    assert result["overrides"]["ceiling"][-1] == "data.train_labels=clean"


def test_a_missing_report_run_is_named_without_training(runs, tmp_path):
    for seed in main_job.REPORT_SEEDS:
        (runs / "iam_elr_ramp20" / f"seed{seed}" / "summary.json").unlink()
    with pytest.raises(SystemExit, match="iam_elr_ramp20/seed2"):
        main_job.main(
            ["--candidates", *VAL, "--runs", str(runs), "--no-train", "--out", str(tmp_path / "o")]
        )


def test_report_only_reads_the_report_seeds_of_the_given_candidates(runs, tmp_path):
    for name in VAL:
        for seed in main_job.TUNING_SEEDS:  # tuning runs are not needed: the choice was made
            (runs / name / f"seed{seed}" / "summary.json").unlink()
    out = tmp_path / "report.json"
    given = ["iam_elr", "ceiling"]
    main_job.main(["--candidates", *given, "--runs", str(runs), "--no-train", "--report-only",
                   "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["chosen"] is None and result["protocol"].startswith("chosen before")
    assert set(result["results"]) == set(given)
    assert result["results"]["iam_elr"]["summary"]["test_clean_mean"] == pytest.approx(0.855)
    assert result["results"]["iam_elr"]["summary"]["val_clean_mean"] is None
    with pytest.raises(SystemExit):
        main_job.main(["--runs", str(runs), "--no-train", "--report-only", "--out", str(out)])

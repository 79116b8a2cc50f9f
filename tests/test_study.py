"""The study's cleanlab anchor scoring (benchmarks/cleanlab_anchor.py), on made-up predictions:
the detection numbers it reports, and cleanlab itself (an optional extra that setup.sh installs)
finding flipped labels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from cleanlab_anchor import _detection  # noqa: E402


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

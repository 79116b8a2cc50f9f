"""The evaluation metrics against values worked out by hand (in the comments) and against a plain
Python reference (confusion counts, pairwise AUROC, binned ECE) on random inputs. No sklearn here:
the metrics themselves use it, so it cannot also be the judge."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dtrain.train.metrics import auroc, classification_metrics, expected_calibration_error


def probs_predicting(predictions: list[int], classes: int) -> np.ndarray:
    """Softmax-like rows whose argmax is the given prediction (0.6 on it, the rest shared)."""
    rest = 0.4 / (classes - 1)
    probs = np.full((len(predictions), classes), rest)
    probs[np.arange(len(predictions)), predictions] = 0.6
    return probs


# Ten samples, three classes:
#   labels      0 0 0 0 0 0 1 1 2 2
#   predictions 0 0 0 0 0 1 1 0 2 1
# accuracy 7/10. Recall: class 0 5/6, class 1 1/2, class 2 1/2 -> balanced (5/6 + 1/2 + 1/2) / 3
# = 11/18. Precision: predicted 0 six times (5 right) 5/6, predicted 1 three times (1 right) 1/3,
# predicted 2 once (right) 1. F1 = 2PR/(P+R): 5/6, 2/5, 2/3 -> macro (5/6 + 2/5 + 2/3) / 3 = 19/30.
LABELS = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
PREDICTIONS = [0, 0, 0, 0, 0, 1, 1, 0, 2, 1]


def test_accuracy_balanced_accuracy_and_macro_f1_by_hand():
    m = classification_metrics(probs_predicting(PREDICTIONS, 3), np.array(LABELS))
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx(11 / 18)
    assert m["macro_f1"] == pytest.approx(19 / 30)


def test_perfect_and_all_wrong_predictions():
    labels = np.array([0, 1, 2, 2, 1, 0])
    perfect = classification_metrics(probs_predicting(list(labels), 3), labels)
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["macro_f1"] == 1.0
    wrong = classification_metrics(probs_predicting([1, 2, 0, 0, 2, 1], 3), labels)
    assert wrong["accuracy"] == wrong["balanced_accuracy"] == wrong["macro_f1"] == 0.0


def test_balanced_accuracy_weights_each_class_equally():
    # 8 of class 0 all right, 2 of class 1 all wrong: accuracy 0.8, balanced (1 + 0) / 2 = 0.5.
    labels = np.array([0] * 8 + [1] * 2)
    m = classification_metrics(probs_predicting([0] * 10, 2), labels)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    # F1: class 0 P = 8/10, R = 1 -> 16/18 = 8/9; class 1 never predicted -> 0. Macro 4/9.
    assert m["macro_f1"] == pytest.approx(4 / 9)


def test_macro_f1_averages_over_the_classes_present_like_auroc():
    # A four-class model on samples of classes 0, 1 and 2 only, all right: class 3 has no
    # sample and is not scored, so macro-F1 is (1 + 1 + 1) / 3, as AUROC leaves it out too.
    labels = np.array([0, 1, 2, 0, 1, 2])
    m = classification_metrics(probs_predicting(list(labels), 4), labels)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == pytest.approx(1.0)
    # the case: a tumour-only external set, every prediction right
    tumour_only = classification_metrics(probs_predicting([1] * 5, 2), np.array([1] * 5))
    assert tumour_only["macro_f1"] == 1.0
    # a prediction of the absent class still costs the present class its recall: P 1, R 2/3
    missed = classification_metrics(probs_predicting([1, 1, 0], 2), np.array([1, 1, 1]))
    assert missed["macro_f1"] == pytest.approx(0.8)


def test_auroc_of_a_multi_class_model_on_two_present_classes():
    # Class 2 absent: p(1) / (p(0) + p(1)) is 0.25, 0.5 on class 0 and 0.75, 0.5 on class 1:
    # 0.75 beats both (2), 0.5 beats 0.25 and ties 0.5 (1.5) -> 3.5 / 4 = 7/8 (class 0's
    # one-vs-rest AUROC is the same, so their mean is too).
    probs = np.array([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2], [0.4, 0.4, 0.2]])
    assert classification_metrics(probs, np.array([0, 0, 1, 1]))["auroc"] == pytest.approx(7 / 8)


def test_binary_auroc_by_hand():
    # negatives score 0.2, 0.5, 0.3; positives 0.7, 0.5. Positive-negative pairs ranked right:
    # 0.7 beats all three (3); 0.5 beats 0.2 and 0.3 and ties 0.5 (2 + 0.5). 5.5 / 6 = 11/12.
    labels = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.2, 0.5, 0.3, 0.7, 0.5])
    probs = np.stack([1 - p1, p1], axis=1)
    assert classification_metrics(probs, labels)["auroc"] == pytest.approx(11 / 12)


# Six samples, three classes, one-vs-rest AUROC averaged over classes (macro):
#   class 0: positives 0.7, 0.4 vs negatives 0.3, 0.5, 0.2, 0.1 -> (4 + 3) / 8 = 7/8
#   class 1: positives 0.6, 0.3 vs negatives 0.2, 0.5, 0.2, 0.3 -> (4 + 2.5) / 8 = 13/16
#   class 2: positives 0.6, 0.6 vs negatives 0.1, 0.1, 0.1, 0.2 -> 8 / 8 = 1
#   mean (7/8 + 13/16 + 1) / 3 = 43/48
OVR_LABELS = np.array([0, 0, 1, 1, 2, 2])
OVR_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.3, 0.6, 0.1],
        [0.5, 0.3, 0.2],
        [0.2, 0.2, 0.6],
        [0.1, 0.3, 0.6],
    ]
)


def test_one_vs_rest_auroc_by_hand():
    assert classification_metrics(OVR_PROBS, OVR_LABELS)["auroc"] == pytest.approx(43 / 48)


def test_one_vs_rest_auroc_renormalises_over_the_classes_present():
    # A fourth class with 0.2 of every row and no samples: dropping it and renormalising gives
    # back the three-class rows above, so the same 43/48.
    probs = np.concatenate([0.8 * OVR_PROBS, np.full((6, 1), 0.2)], axis=1)
    assert classification_metrics(probs, OVR_LABELS)["auroc"] == pytest.approx(43 / 48)


def test_auroc_is_nan_with_one_class_only():
    labels = np.zeros(4, dtype=int)
    assert math.isnan(classification_metrics(probs_predicting([0, 1, 0, 1], 2), labels)["auroc"])
    assert math.isnan(classification_metrics(probs_predicting([0, 1, 2, 0], 3), labels)["auroc"])
    scores = np.array([0.1, 0.2, 0.3])
    assert math.isnan(auroc(scores, np.ones(3, dtype=bool)))
    assert math.isnan(auroc(scores, np.zeros(3, dtype=bool)))


def test_mislabel_auroc_direction():
    # wrong labels (positives) score 0.9 and 0.3; correct ones 0.1, 0.4, 0.2.
    # 0.9 beats all three (3), 0.3 beats 0.1 and 0.2 (2): 5/6. The inverted score ranks every
    # pair the other way: 1/6.
    positives = np.array([True, False, False, True, False])
    scores = np.array([0.9, 0.1, 0.4, 0.3, 0.2])
    assert auroc(scores, positives) == pytest.approx(5 / 6)
    assert auroc(-scores, positives) == pytest.approx(1 / 6)
    assert auroc(1 - scores, positives) == pytest.approx(1 - 5 / 6)
    separating = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    assert auroc(separating, positives) == 1.0
    assert auroc(-separating, positives) == 0.0


# ECE example, six samples:
#   probs                label  confidence  correct
#   0.90 0.05 0.05         0      0.90        1
#   0.85 0.10 0.05         1      0.85        0
#   0.10 0.70 0.20         1      0.70        1
#   0.50 0.30 0.20         0      0.50        1
#   0.45 0.35 0.20         2      0.45        0
#   0.20 0.15 0.65         2      0.65        1
# 5 bins (edges 0.2, 0.4, 0.6, 0.8): [0.8, 1] holds 0.90, 0.85: |1/2 - 0.875| = 0.375;
# [0.6, 0.8) holds 0.70, 0.65: |1 - 0.675| = 0.325; [0.4, 0.6) holds 0.50, 0.45: |1/2 - 0.475| =
# 0.025. Each bin weighs 2/6: ECE = (0.375 + 0.325 + 0.025) / 3 = 0.725 / 3.
# 15 bins (width 1/15): 0.90 -> bin 13, 0.85 -> 12, 0.70 -> 10, 0.65 -> 9, 0.50 -> 7, 0.45 -> 6,
# one sample each: ECE = mean |correct - confidence| = (0.1 + 0.85 + 0.3 + 0.5 + 0.45 + 0.35) / 6.
# 1 bin: |4/6 - 4.05/6| = 0.05 / 6.
ECE_PROBS = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.85, 0.10, 0.05],
        [0.10, 0.70, 0.20],
        [0.50, 0.30, 0.20],
        [0.45, 0.35, 0.20],
        [0.20, 0.15, 0.65],
    ]
)
ECE_LABELS = np.array([0, 1, 1, 0, 2, 2])


def test_expected_calibration_error_by_hand():
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, bins=5) == pytest.approx(0.725 / 3)
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS) == pytest.approx(2.55 / 6)
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, bins=1) == pytest.approx(0.05 / 6)
    assert classification_metrics(ECE_PROBS, ECE_LABELS)["ece"] == pytest.approx(2.55 / 6)


def test_expected_calibration_error_edges():
    # Confidence 1.0 falls in the top bin; certain and right is perfectly calibrated.
    one_hot = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(one_hot, np.array([0, 1, 2, 1])) == 0.0
    # Certain and always wrong: |0 - 1| = 1.
    assert expected_calibration_error(one_hot, np.array([1, 2, 0, 0])) == pytest.approx(1.0)
    # Confidence 0.75 on four samples, three right: calibrated, 0 in any binning.
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1]), bins=10) == pytest.approx(0)


# Plain Python references, for random inputs.


def reference_classification(predictions: list[int], labels: list[int], classes: int) -> dict:
    recalls, f1s = [], []
    for c in range(classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        predicted = sum(p == c for p in predictions)
        actual = sum(y == c for y in labels)
        if actual:
            recalls.append(tp / actual)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "macro_f1": sum(f1s) / classes,
    }


def reference_auroc(scores: list[float], positives: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def reference_ece(probs: list[list[float]], labels: list[int], bins: int) -> float:
    total, n = 0.0, len(labels)
    members: dict[int, list[tuple[float, bool]]] = {}
    for row, y in zip(probs, labels, strict=True):
        confidence = max(row)
        b = min(int(confidence * bins), bins - 1)
        members.setdefault(b, []).append((confidence, row.index(confidence) == y))
    for items in members.values():
        accuracy = sum(c for _, c in items) / len(items)
        mean_confidence = sum(p for p, _ in items) / len(items)
        total += len(items) / n * abs(accuracy - mean_confidence)
    return total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_metrics_match_a_plain_python_reference(seed, classes):
    rng = random.Random(seed * 10 + classes)
    n = 60
    labels = [rng.randrange(classes) for _ in range(n)]
    labels[:classes] = range(classes)  # every class present
    rows = []
    for y in labels:
        logits = [rng.gauss(0, 1) + (1.5 if c == y else 0.0) for c in range(classes)]
        exp = [math.exp(v) for v in logits]
        rows.append([e / sum(exp) for e in exp])
    predictions = [row.index(max(row)) for row in rows]
    m = classification_metrics(np.array(rows), np.array(labels))
    for key, value in reference_classification(predictions, labels, classes).items():
        assert m[key] == pytest.approx(value), key
    if classes == 2:
        want = reference_auroc([r[1] for r in rows], [y == 1 for y in labels])
    else:
        want = (
            sum(
                reference_auroc([r[c] for r in rows], [y == c for y in labels])
                for c in range(classes)
            )
            / classes
        )
    assert m["auroc"] == pytest.approx(want)
    assert m["ece"] == pytest.approx(reference_ece(rows, labels, 15))
    for bins in (1, 4, 10):
        assert expected_calibration_error(
            np.array(rows), np.array(labels), bins=bins
        ) == pytest.approx(reference_ece(rows, labels, bins))
    scores = [rng.random() for _ in range(n)]
    flags = [rng.random() < 0.3 for _ in range(n)]
    flags[:2] = [True, False]
    assert auroc(np.array(scores), np.array(flags)) == pytest.approx(reference_auroc(scores, flags))


def test_metric_names_are_the_keys_classification_metrics_returns():
    import numpy as np

    from dtrain.train.metrics import METRIC_NAMES, classification_metrics

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert tuple(classification_metrics(probs, np.array([0, 1, 1]))) == METRIC_NAMES

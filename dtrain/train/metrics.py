"""Evaluation metrics: accuracy, balanced accuracy, macro-F1, one-vs-rest AUROC and expected
calibration error, and the AUROC of a mislabel score for finding the injected wrong labels."""

from __future__ import annotations

import numpy as np

# sklearn is imported where it is used: it takes seconds, and every dtrain command imports the
# metric names (a `dtrain launch` refusal should not wait for it)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """AUROC of `scores` for flagging `positives`; NaN when only one kind is present."""
    if positives.all() or not positives.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positives, scores))


METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")


# the one rule for the class-averaged metrics, said beside them in `dtrain eval`'s output
CLASS_AVERAGE_RULE = "macro_f1 and auroc average over the classes present in the labels"


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """probs [N, C] (softmax), labels [N] -> accuracy, balanced accuracy, macro-F1, AUROC, ECE.

    Macro-F1 and AUROC average over the classes present in `labels` (CLASS_AVERAGE_RULE): a
    class no sample has cannot be scored, and counting it as F1 0 would cap a perfect model's
    score on a one-class external set at 1/C. Predictions of an absent class still count
    against the class of the sample."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    predictions = probs.argmax(axis=1)
    present = np.unique(labels)
    # AUROC over the classes present, with the probabilities renormalised over them
    restricted = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    if len(present) < 2:
        roc = float("nan")
    elif len(present) == 2:  # sklearn's multi-class mode refuses two classes
        roc = float(roc_auc_score(labels == present[1], restricted[:, 1]))
    else:
        roc = float(roc_auc_score(labels, restricted, multi_class="ovr", labels=present))
    return {
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(
            f1_score(labels, predictions, average="macro", labels=present, zero_division=0)
        ),
        "auroc": roc,
        "ece": expected_calibration_error(probs, labels),
    }

"""Stratified, seeded train/val/test split that keeps every near-duplicate group in one split."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def stratified_group_split(
    labels: np.ndarray, groups: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per sample.

    Groups are visited largest first (random order among equals) and each goes to the split whose
    share of the group's majority class lags its target the most.
    """
    fractions_arr = np.asarray(fractions, dtype=np.float64)
    num_classes = int(labels.max()) + 1
    group_ids, group_of = np.unique(groups, return_inverse=True)
    sizes = np.bincount(group_of)
    per_group = np.zeros((len(group_ids), num_classes), dtype=np.int64)
    np.add.at(per_group, (group_of, labels), 1)
    majority = per_group.argmax(axis=1)
    target = fractions_arr[:, None] * np.bincount(labels, minlength=num_classes)[None, :]
    filled = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(group_ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    split_of_group = np.empty(len(group_ids), dtype=np.int64)
    for g in order:
        c = majority[g]
        lag = target[:, c] - filled[:, c]
        lag[fractions_arr == 0] = -np.inf
        s = int(np.argmax(lag))
        split_of_group[g] = s
        filled[s, c] += sizes[g]
    return split_of_group[group_of]

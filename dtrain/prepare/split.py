"""The unit of splitting (near-duplicate groups joined with the user's patients or studies) and
the stratified, seeded train/val/test split that keeps every such group in one split."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def join_groups(*groupings: np.ndarray) -> np.ndarray:
    """Group id per sample: connected components of "shares a group in any of `groupings`" (two
    scans of one patient, or two near-duplicates, end up in one group), numbered by first
    appearance."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(groupings[0])
    rows, cols, offset = [], [], n
    for grouping in groupings:
        _, ids = np.unique(grouping, return_inverse=True)
        rows.append(np.arange(n))  # sample -> a node for its group in this grouping
        cols.append(offset + ids)
        offset += int(ids.max()) + 1
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(offset, offset))
    _, labels = connected_components(graph, directed=False)
    return number_by_first_appearance(labels[:n])


def number_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """0 for the first sample's group, 1 for the next new one, ...: ids that do not depend on
    how a graph search happened to number its components."""
    _, first_seen, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first_seen))
    return rank[inverse].astype(np.int64)


def pairs_across_splits(groups: np.ndarray, split_of: np.ndarray) -> int:
    """How many pairs of samples share a group but not a split."""
    counts = np.zeros((int(groups.max()) + 1, len(SPLITS)), dtype=np.int64)
    np.add.at(counts, (groups, split_of), 1)
    return int((counts.sum(axis=1) ** 2 - (counts**2).sum(axis=1)).sum() // 2)


def stratified_group_split(
    labels: np.ndarray, groups: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per sample; a split of fraction 0 stays empty.

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

"""Near-duplicate grouping: images whose downscaled pixels correlate above a threshold share a
group, so that a split by group keeps copies of one scan out of both train and test."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dtrain.dataset.images import open_image, to_8bit
from dtrain.prepare.split import number_by_first_appearance

THUMB_SIDE = 16


class BadImageError(ValueError):
    """An image that cannot be decoded."""


def decode_thumbnail(data: bytes, side: int = THUMB_SIDE) -> tuple[np.ndarray, bool, tuple]:
    """Grayscale `side x side` float32 pixels, whether the image is grayscale, and its size.

    The JPEG decoder's draft mode downsamples while decoding, which makes this cheap. Truncated
    files and decompression bombs (`open_image`) are bad images.
    """
    try:
        image = open_image(data)
        size = image.size
        image.draft(None, (side * 4, side * 4))
        image = to_8bit(image).convert("RGB")
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise BadImageError(str(err)) from err
    rgb = np.asarray(image.resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    is_gray = bool(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max() < 8.0)
    return rgb.mean(axis=2), is_gray, size


def standardise(thumbs: np.ndarray) -> np.ndarray:
    """Rows with zero mean and unit norm, so that a dot product is a Pearson correlation."""
    x = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-8)).astype(np.float32)


def near_duplicate_groups(thumbs: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Group id per image: connected components of the graph `corr(i, j) > threshold`.

    Exact copies correlate at 1.0. Constant images (no variance) only join their exact copies.
    Work is O(N^2 P) in blocks of `block` rows, memory O(block N).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    x = standardise(thumbs)
    n = len(x)
    flat = thumbs.reshape(n, -1)
    constant = np.ptp(flat, axis=1) == 0
    rows, cols = [], []
    for start in range(0, n, block):
        sim = x[start : start + block] @ x.T
        i, j = np.nonzero(sim > threshold)
        i += start
        keep = j > i
        rows.append(i[keep])
        cols.append(j[keep])
    # constant images: join only exact copies (same value everywhere)
    if constant.any():
        idx = np.flatnonzero(constant)
        _, first = np.unique(flat[idx, 0], return_inverse=True)
        for value in np.unique(first):
            members = idx[first == value]
            rows.append(members[:-1])
            cols.append(members[1:])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return number_by_first_appearance(labels)

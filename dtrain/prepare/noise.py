"""Synthetic label noise with a recorded transition matrix.

`symmetric`: in each class exactly round(rate * n_c) labels move to another class chosen uniformly.
`asymmetric`: the same count moves along a class map (next class by default); a class mapped to
itself keeps its labels, so that one-way errors (missed tumours: 0,0) can be made.
`instance`: the flip probability depends on the image, as in Xia et al., "Part-dependent label
noise" (NeurIPS 2020): per-sample rate q ~ N(rate, 0.1^2) truncated to [0, 1], flip direction
from a random linear projection of the image's pixels, so similar images flip alike.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from dtrain.errors import ConfigError

NoiseModel = Literal["none", "symmetric", "asymmetric", "instance"]
NOISE_MODELS: tuple[NoiseModel, ...] = get_args(NoiseModel)


def check_noise(
    model: str,
    rate: float,
    num_classes: int,
    mapping: list[int] | None,
    class_names: list[str] | None = None,
) -> None:
    """Refuse a request whose noise cannot be made or would leave the wrong label the most
    common one; `class_names`, where known, name the class a bad map entry belongs to."""
    if model not in NOISE_MODELS:
        raise ConfigError(f"noise model {model!r} is not one of {NOISE_MODELS}")
    if model == "none":
        return
    if num_classes < 2:
        raise ConfigError("label noise needs at least 2 classes")
    limit = 0.5 if model == "asymmetric" else 1 - 1 / num_classes
    if not 0 <= rate < limit:
        raise ConfigError(
            f"noise rate {rate} must lie in [0, {limit:.3g}) for {model} noise with "
            f"{num_classes} classes; above it the wrong label is the most common one"
        )
    if mapping is None:
        return
    if len(mapping) != num_classes or not all(0 <= m < num_classes for m in mapping):
        raise ConfigError(
            f"noise map {mapping} must give one target class in [0, {num_classes}) per class"
        )
    if model == "asymmetric" and all(target == c for c, target in enumerate(mapping)):
        names = f" ({', '.join(class_names)})" if class_names else ""
        raise ConfigError(
            f"noise map {mapping} keeps every class{names}: asymmetric noise needs at least one "
            "class whose labels move to another"
        )


def apply_noise(
    labels: np.ndarray,
    num_classes: int,
    model: str,
    rate: float,
    seed: int,
    mapping: list[int] | None = None,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """Noisy copy of `labels`; the same arguments always give the same result."""
    check_noise(model, rate, num_classes, mapping)
    noisy = labels.copy()
    if model == "none" or rate == 0 or len(labels) == 0:
        return noisy
    rng = np.random.default_rng(seed)
    if model == "instance":
        if features is None:
            raise ValueError("instance noise needs per-sample image features")
        return _instance_noise(labels, num_classes, rate, rng, features)
    if model == "asymmetric":
        mapping = mapping or [(c + 1) % num_classes for c in range(num_classes)]
    for c in range(num_classes):
        if model == "asymmetric" and mapping[c] == c:
            continue  # this class keeps its labels
        members = np.flatnonzero(labels == c)
        flipped = rng.choice(members, size=int(round(rate * len(members))), replace=False)
        if model == "symmetric":
            offset = rng.integers(1, num_classes, size=len(flipped))
            noisy[flipped] = (c + offset) % num_classes
        else:
            noisy[flipped] = mapping[c]
    return noisy


def _instance_noise(
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    rng: np.random.Generator,
    features: np.ndarray,
) -> np.ndarray:
    from scipy.stats import truncnorm

    std = 0.1
    q = truncnorm.rvs(
        (0 - rate) / std, (1 - rate) / std, loc=rate, scale=std, size=len(labels), random_state=rng
    )
    x = features.reshape(len(features), -1).astype(np.float64)
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-8)
    w = rng.standard_normal((num_classes, x.shape[1], num_classes))
    scores = np.empty((len(labels), num_classes))
    for c in range(num_classes):
        members = labels == c
        scores[members] = x[members] @ w[c]
    rows = np.arange(len(labels))
    scores[rows, labels] = -np.inf
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs *= (q / probs.sum(axis=1))[:, None]
    probs[rows, labels] = 1 - q
    cumulative = probs.cumsum(axis=1)
    draw = rng.random(len(labels))[:, None] * cumulative[:, -1:]
    return (draw > cumulative).sum(axis=1).astype(labels.dtype)


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Realised T[i, j] = P(noisy = j | clean = i); rows of absent classes are zero."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (clean, noisy), 1)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

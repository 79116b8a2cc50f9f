"""Label noise: the realised rate and transition matrix match the request within sampling error,
and the same seed gives the same labels."""

from __future__ import annotations

import numpy as np
import pytest

from dtrain.errors import ConfigError
from dtrain.prepare.noise import apply_noise, check_noise, transition_matrix

N_PER_CLASS = 4000


def labels(num_classes: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), N_PER_CLASS)


def sampling_sigma(p: float, n: int) -> float:
    return float(np.sqrt(p * (1 - p) / n))


def test_symmetric_rate_and_uniform_off_diagonal():
    clean = labels(4)
    noisy = apply_noise(clean, 4, "symmetric", 0.4, seed=1)
    t = transition_matrix(clean, noisy, 4)
    np.testing.assert_allclose(np.diag(t), 0.6, atol=1 / N_PER_CLASS)
    off = t[~np.eye(4, dtype=bool)]
    # each wrong class gets 0.4 / 3 of a class; binomial sampling error on that share
    assert np.abs(off - 0.4 / 3).max() < 4 * sampling_sigma(1 / 3, int(0.4 * N_PER_CLASS)) * 0.4
    np.testing.assert_allclose(t.sum(axis=1), 1)


def test_asymmetric_follows_the_map():
    clean = labels(3)
    noisy = apply_noise(clean, 3, "asymmetric", 0.3, seed=0, mapping=[2, 0, 1])
    expected = np.array([[0.7, 0, 0.3], [0.3, 0.7, 0], [0, 0.3, 0.7]])
    np.testing.assert_allclose(transition_matrix(clean, noisy, 3), expected, atol=1e-3)
    default = apply_noise(clean, 3, "asymmetric", 0.3, seed=0)  # next class
    np.testing.assert_allclose(transition_matrix(clean, default, 3)[0], [0.7, 0.3, 0], atol=1e-3)


def test_instance_noise_depends_on_the_image_and_matches_the_rate():
    rng = np.random.default_rng(0)
    clean = labels(3)
    features = rng.standard_normal((len(clean), 64))
    noisy = apply_noise(clean, 3, "instance", 0.3, seed=5, features=features)
    rate = (noisy != clean).mean()
    # per-sample rates ~ N(0.3, 0.1) truncated: the mean is 0.3; the draw adds binomial error
    assert abs(rate - 0.3) < 4 * sampling_sigma(0.3, len(clean)) + 0.005
    # the flip direction comes from the image: each of 20 images, repeated, leans to one of
    # the two wrong classes instead of splitting 50/50 as symmetric noise would
    images = np.repeat(features[:20], 500, axis=0)
    flips = apply_noise(
        np.zeros(len(images), dtype=np.int64), 3, "instance", 0.3, seed=5, features=images
    ).reshape(20, 500)
    share = np.array([(row == 1).sum() / max(1, (row != 0).sum()) for row in flips])
    assert np.abs(share - 0.5).mean() > 0.3, share


@pytest.mark.parametrize("model", ["symmetric", "asymmetric", "instance"])
def test_same_seed_same_labels_other_seed_other_labels(model):
    clean = labels(3)
    features = np.random.default_rng(0).standard_normal((len(clean), 16))
    a = apply_noise(clean, 3, model, 0.2, seed=11, features=features)
    b = apply_noise(clean, 3, model, 0.2, seed=11, features=features)
    c = apply_noise(clean, 3, model, 0.2, seed=12, features=features)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_no_noise_and_zero_rate_leave_labels_alone():
    clean = labels(2)
    np.testing.assert_array_equal(apply_noise(clean, 2, "none", 0.0, seed=0), clean)
    np.testing.assert_array_equal(apply_noise(clean, 2, "symmetric", 0.0, seed=0), clean)


@pytest.mark.parametrize(
    "model, rate, classes, mapping, match",
    [
        ("symmetric", 0.5, 2, None, r"must lie in \[0, 0.5\)"),
        ("asymmetric", 0.6, 5, None, r"must lie in \[0, 0.5\)"),
        ("symmetric", -0.1, 3, None, "must lie in"),
        ("asymmetric", 0.2, 3, [1, 2], "noise map"),
        ("asymmetric", 0.2, 3, [1, 3, 0], "noise map"),
        ("asymmetric", 0.2, 3, [0, 1, 2], r"noise map \[0, 1, 2\] keeps every class"),
        ("gaussian", 0.2, 3, None, "is not one of"),
    ],
)
def test_invalid_requests_are_refused(model, rate, classes, mapping, match):
    with pytest.raises(ConfigError, match=match):
        apply_noise(labels(classes), classes, model, rate, seed=0, mapping=mapping)


def test_a_map_that_moves_nothing_names_the_classes():
    with pytest.raises(ConfigError, match=r"keeps every class \(no, yes\)"):
        check_noise("asymmetric", 0.2, 2, [0, 1], ["no", "yes"])


def test_a_class_mapped_to_itself_keeps_its_labels():
    """One-way errors: with two classes, the only asymmetric noise that differs from symmetric."""
    clean = labels(2)
    noisy = apply_noise(clean, 2, "asymmetric", 0.3, seed=0, mapping=[0, 0])
    expected = np.array([[1.0, 0.0], [0.3, 0.7]])
    np.testing.assert_allclose(transition_matrix(clean, noisy, 2), expected, atol=1e-3)

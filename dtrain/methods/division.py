"""Dividing probably-clean from suspect labels by a per-sample loss: the posterior of the
low-loss component of a two-component GMM (DivideMix's co-divide), over all samples or per given
class (a weak model's losses split by class first: the class it predicts has the low losses)."""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture


def clean_probability(sample_loss: np.ndarray) -> np.ndarray:
    """Each sample's posterior of the low-loss component of a two-component GMM on the min-max
    normalised losses (DivideMix's GMM settings: 10 EM steps, tol 1e-2, reg 5e-4)."""
    loss = np.asarray(sample_loss, dtype=np.float64)
    span = loss.max() - loss.min() if len(loss) else 0.0
    if len(loss) < 2 or span <= 0:
        return np.ones_like(loss)  # one loss value: nothing to divide
    x = ((loss - loss.min()) / span).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0)
    gmm.fit(x)
    return gmm.predict_proba(x)[:, int(gmm.means_.argmin())]


def divide(sample_loss: np.ndarray, labels: np.ndarray, per_class: bool) -> np.ndarray:
    """clean_probability over all samples, or within each given class."""
    if not per_class:
        return clean_probability(sample_loss)
    out = np.ones(len(sample_loss))
    for c in np.unique(labels):
        members = labels == c
        out[members] = clean_probability(sample_loss[members])
    return out

"""The learning-rate schedule: linear warm-up, then cosine to zero."""

from __future__ import annotations

import math

import pytest

from dtrain.train.lr_schedule import lr_factor


def test_lr_factor_warmup_then_cosine():
    warmup, total = 2.0, 10.0
    assert lr_factor(0.0, warmup, total) == pytest.approx(0.0, abs=1e-3)
    assert lr_factor(1.0, warmup, total) == pytest.approx(0.5, abs=1e-3)  # mid warm-up
    assert lr_factor(2.0, warmup, total) == 1.0  # end of warm-up
    assert lr_factor(4.0, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6.0, warmup, total) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(10.0, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12.0, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.0, 0.0, total) == 1.0  # no warm-up: full rate at once


def test_lr_factor_never_exceeds_one():
    grid = [i / 10_000 for i in range(0, 30_001)]
    assert max(lr_factor(p, 1.0, 3.0) for p in grid) <= 1.0

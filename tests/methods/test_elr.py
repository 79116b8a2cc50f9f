"""ELR's regulariser and target update against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import load_config
from dtrain.methods import losses
from dtrain.methods.steps import elr_targets_rule


def test_the_regulariser_on_a_hand_computed_case():
    # p = softmax([0, ln 3]) = [1/4, 3/4]; t(k-1) = [1, 0], beta = 1/2
    # t(k) = [1/2 + 1/8, 3/8] = [5/8, 3/8]; <p, t> = 5/32 + 9/32 = 7/16; R = log(9/16)
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    penalty, observed = losses.elr_term(logits, torch.tensor([[1.0, 0.0]]), 0.5, None)
    assert penalty.item() == pytest.approx(math.log(9 / 16))
    assert observed[0].tolist() == pytest.approx([0.25, 0.75])
    assert not observed.requires_grad  # the target is a constant of the step
    penalty.backward()
    # dR/dz0 = -1/(1 - 7/16) * p0 p1 (t0 - t1) = -(16/9)(3/16)(1/4) = -1/12: towards the target
    assert logits.grad[0, 0].item() == pytest.approx(-1 / 12)


def test_padding_does_not_count_and_probabilities_are_clamped():
    logits = torch.tensor([[0.0, math.log(3.0)], [100.0, -100.0]])
    previous = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    valid = torch.tensor([True, False])
    penalty, observed = losses.elr_term(logits, previous, 0.5, valid)
    assert penalty.item() == pytest.approx(math.log(9 / 16))
    assert torch.isfinite(observed).all() and observed[1, 1].item() == pytest.approx(1e-4, rel=1e-3)


def test_the_targets_average_each_epochs_prediction_with_beta():
    rule = elr_targets_rule(load_config(None, ["method.elr_beta=0.7"]).method, num_classes=2)
    assert (rule.width, rule.initial) == (2, 0.0)
    new = rule.end_epoch(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.2, 0.8]] * 2))
    assert new.flatten().tolist() == pytest.approx([0.06, 0.24, 0.76, 0.24])

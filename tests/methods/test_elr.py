"""ELR's regulariser and target update against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import load_config
from dtrain.methods import losses
from dtrain.methods.elr import elr_targets_rule, elr_weight, refined_targets, refining


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
    assert rule.initial == (0.0, 0.0, 1.0, -1.0)  # t, the clean probability, the label
    previous = torch.tensor([[0.0, 0.0, 1.0, -1.0], [1.0, 0.0, 1.0, 0.0]])
    observed = torch.tensor([[0.2, 0.8, 0.3, 1.0], [0.2, 0.8, 2.0, 0.0]])  # p, loss, label
    new = rule.end_epoch(previous, observed)
    assert new[:, :2].flatten().tolist() == pytest.approx([0.06, 0.24, 0.76, 0.24])
    assert new[:, 2].tolist() == [1.0, 1.0]  # not refining: every label trusted
    assert new[:, 3].tolist() == [1.0, 0.0]


def test_while_refining_a_per_class_gmm_gives_each_label_its_clean_probability():
    cfg = load_config(None, ["method.name=elr", "method.elr_refine_from=2"]).method
    rule = elr_targets_rule(cfg, num_classes=2)
    labels = torch.arange(40) % 2
    wrong = torch.arange(40) < 10  # 5 per class, with high losses
    loss = torch.where(labels == 0, 0.1, 0.5) + wrong * 2.0 + torch.rand(40) * 0.05
    observed = torch.cat([torch.full((40, 2), 0.5), loss[:, None], labels[:, None].float()], 1)
    clean = rule.end_epoch(torch.zeros(40, 4), observed)[:, 2]
    assert ((clean > 0.5) == ~wrong).all()


def test_the_refined_target_is_the_label_where_trusted_and_the_average_where_not():
    # t = [0.3, 0.1] (normalised [0.75, 0.25]); w = 1: the label; w = 0: t; w = 1/2: halfway
    memory = torch.tensor([[0.3, 0.1, 1.0, 0], [0.3, 0.1, 0.0, 0], [0.3, 0.1, 0.5, 0]])
    target = refined_targets(memory, torch.tensor([1, 1, 1]), num_classes=2)
    expected = [[0.0, 1.0], [0.75, 0.25], [0.375, 0.625]]
    for row, want in zip(target.tolist(), expected, strict=True):
        assert row == pytest.approx(want)


def test_refinement_starts_at_its_epoch():
    cfg = load_config(None, ["method.name=elr", "method.elr_refine_from=3"]).method
    assert [refining(cfg, e) for e in (0, 2, 3, 9)] == [False, False, True, True]
    assert not refining(load_config(None, ["method.name=elr"]).method, 9)


def test_the_weight_ramps_up_to_lambda_over_its_epochs():
    # lambda exp(-5 (1 - e/4)^2) with lambda = 3, then lambda
    cfg = load_config(None, ["method.name=iam_elr", "method.elr_rampup_epochs=4"]).method
    expected = [
        3 * math.exp(-5),
        3 * math.exp(-45 / 16),
        3 * math.exp(-1.25),
        3 * math.exp(-5 / 16),
    ]
    assert [elr_weight(cfg, e) for e in range(6)] == pytest.approx([*expected, 3, 3])
    assert elr_weight(load_config(None, ["method.name=elr"]).method, 0) == 3.0  # the paper's

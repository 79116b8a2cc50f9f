"""DivideMix's parts: the GMM co-divide on a planted two-mode loss, sharpening, the MixMatch loss
against a hand-computed case, and each peer training on its peer's division."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dtrain.config import load_config
from dtrain.methods.dividemix import division_rule, mixmatch_loss, sharpen
from dtrain.methods.division import clean_probability
from dtrain.methods.model import build_model
from dtrain.methods.steps import training_step


def planted_losses(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """300 well-fitted samples (loss about 0.1) and 100 wrong labels (loss about 2)."""
    rng = np.random.default_rng(seed)
    clean = np.abs(rng.normal(0.1, 0.05, 300))
    noisy = rng.normal(2.0, 0.3, 100)
    return np.concatenate([clean, noisy]), np.r_[np.ones(300, bool), np.zeros(100, bool)]


def test_the_gmm_divides_a_planted_two_mode_loss():
    loss, is_clean = planted_losses()
    w = clean_probability(loss)
    assert ((w > 0.5) == is_clean).mean() >= 0.99
    assert w[is_clean].min() > 0.9 and w[~is_clean].max() < 0.1


def test_one_loss_value_divides_nothing():
    assert clean_probability(np.full(5, 0.7)).tolist() == [1.0] * 5


def test_the_division_rule_divides_each_peers_losses_on_their_own():
    loss, is_clean = planted_losses()
    cfg = load_config(None, ["method.name=dividemix"]).method
    rule = division_rule(cfg, num_classes=2)
    assert (rule.width, rule.initial) == (3, (1.0, 1.0, -1.0))
    peer_b = loss[::-1].copy()  # the second peer sees the planted order reversed
    labels = np.arange(400) % 2
    observed = torch.tensor(np.stack([loss, peer_b, labels], 1), dtype=torch.float32)
    w = rule.end_epoch(torch.ones(400, 3), observed)
    assert ((w[:, 0] > 0.5).numpy() == is_clean).mean() >= 0.99
    assert ((w[:, 1] > 0.5).numpy() == is_clean[::-1]).mean() >= 0.99
    assert torch.equal(w[:, 2], observed[:, 2])  # the label rides along


def test_per_class_division_does_not_divide_by_class():
    """A weak model predicting class 0 for everything: class 0's labels have low losses, class
    1's high ones, and the planted wrong labels are higher still within each class. One GMM
    divides by class; one per class finds the wrong labels in both."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(200), np.ones(200)]
    wrong = np.r_[np.arange(200) < 50, np.arange(200) < 50]
    loss = np.where(labels == 0, 0.2, 1.5) + np.where(wrong, 0.6, 0.0)
    loss = loss + rng.normal(0, 0.05, 400)
    observed = torch.tensor(np.stack([loss, loss, labels], 1), dtype=torch.float32)
    results = {}
    for divide in ("global", "per_class"):
        cfg = load_config(None, ["method.name=dividemix", f"method.dividemix_divide={divide}"])
        w = division_rule(cfg.method, 2).end_epoch(torch.ones(400, 3), observed)[:, 0].numpy()
        results[divide] = ((w > 0.5) == ~wrong).mean()
    assert results["per_class"] >= 0.98
    assert results["global"] <= 0.75  # class 1's right labels called wrong


def test_sharpen_by_hand():
    # [1/4, 3/4] at T = 1/2: [1/16, 9/16] / (10/16)
    assert sharpen(torch.tensor([[0.25, 0.75]]), 0.5)[0].tolist() == pytest.approx([0.1, 0.9])


def test_the_mixmatch_loss_by_hand():
    # zero logits: p = [1/2, 1/2] everywhere. Row 0 labelled, target [1, 0]: L_X = log 2.
    # Row 1 unlabelled, target [0.2, 0.8]: L_U = mean(0.3^2, 0.3^2) = 0.09. Mean p is uniform:
    # L_reg = 0. Row 2 is padding with a wild target: it must not count.
    logits = torch.zeros(3, 2)
    targets = torch.tensor([[1.0, 0.0], [0.2, 0.8], [50.0, -50.0]])
    labelled = torch.tensor([True, False, False])
    valid = torch.tensor([True, True, False])
    loss, terms = mixmatch_loss(logits, targets, labelled, valid, lambda_u=2.0)
    assert terms["l_x"].item() == pytest.approx(math.log(2))
    assert terms["l_u"].item() == pytest.approx(0.09)
    assert terms["l_reg"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(math.log(2) + 2 * 0.09)


def test_the_prior_penalty_grows_when_the_mean_prediction_leaves_uniform():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    _, terms = mixmatch_loss(
        logits,
        torch.tensor([[1.0, 0.0]] * 2),
        torch.ones(2, dtype=torch.bool),
        torch.ones(2, dtype=torch.bool),
        lambda_u=0.0,
    )
    p0 = 1 / (1 + math.exp(-3))
    assert terms["l_reg"].item() == pytest.approx(
        0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0))
    )


def peer_gradients(memory: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    cfg = load_config(None, ["method.name=dividemix", "model.backbone=test_resnet"])
    torch.manual_seed(0)
    model = build_model(cfg.model, "dividemix", num_classes=2, in_chans=1)
    batch = {
        "view1": torch.randn(8, 1, 32, 32),
        "view2": torch.randn(8, 1, 32, 32),
        "label": torch.tensor([0, 1] * 4),
        "valid": torch.ones(8, dtype=torch.bool),
        "memory": memory,
    }
    torch.manual_seed(1)  # the same mixing draws
    out = training_step(model, batch, cfg.method, epoch=9, num_classes=2, forget_rate=0.0)
    out.loss.backward()
    return {
        f"peer{k}": [p.grad.clone() for p in peer.parameters() if p.grad is not None]
        for k, peer in enumerate(model.peers)
    }, out


def test_each_peer_trains_on_the_division_its_peer_made():
    """Column k is peer k's division: changing it changes what the other peer learns only."""
    base = torch.ones(8, 3)
    changed = base.clone()
    changed[:4, 0] = 0.0  # peer 0 now calls half the batch noisy
    grads_a, out_a = peer_gradients(base)
    grads_b, out_b = peer_gradients(changed)
    assert all(torch.equal(a, b) for a, b in zip(grads_a["peer0"], grads_b["peer0"], strict=True))
    assert not all(
        torch.allclose(a, b) for a, b in zip(grads_a["peer1"], grads_b["peer1"], strict=True)
    )
    assert out_a.terms["labelled"].item() == pytest.approx(1.0)
    assert out_b.terms["labelled"].item() == pytest.approx(0.75)  # (1 + 1/2) / 2
    assert out_a.memory.shape == (8, 3) and torch.isfinite(out_a.memory).all()
    assert out_a.memory[:, 2].tolist() == [0.0, 1.0] * 4  # the labels, for a per-class division

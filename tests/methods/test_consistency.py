"""FixMatch's confident-prediction consistency (method.consistency_lambda) against values worked
out by hand, and where it may be switched on."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import load_config
from dtrain.errors import ConfigError
from dtrain.methods import losses
from dtrain.methods.losses import ramp
from dtrain.methods.model import build_model
from dtrain.methods.steps import training_step


def test_only_confident_first_views_teach_the_second_and_the_mean_is_over_the_batch():
    # first views: softmax([ln 19, 0]) = [0.95, 0.05] (confident, pseudo-label 0);
    # softmax([0, 0]) = [0.5, 0.5] (not); softmax([0, ln 99]) = [0.01, 0.99] (confident, 1);
    # the last row is padding. Second views: [0, ln 3] -> p = [1/4, 3/4] for every row.
    teacher = torch.tensor([[math.log(19.0), 0.0], [0.0, 0.0], [0.0, math.log(99.0)], [9.0, 0.0]])
    student = torch.tensor([[0.0, math.log(3.0)]] * 4, requires_grad=True)
    valid = torch.tensor([True, True, True, False])
    loss = losses.confident_consistency(teacher, student, 0.95, valid)
    # (CE(0) = log 4 + CE(1) = log 4/3) over the 3 valid samples, the unconfident one counted as 0
    assert loss.item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 3)
    loss.backward()
    # d CE(y)/dz = p - onehot(y), / 3; the unconfident and the padding rows get nothing
    expected = [[-0.75 / 3, 0.75 / 3], [0.0, 0.0], [0.25 / 3, -0.25 / 3], [0.0, 0.0]]
    assert student.grad.tolist() == [pytest.approx(row) for row in expected]


def test_the_ramp_reaches_its_weight_and_stays():
    assert ramp(2.0, 0, 0) == 2.0  # no ramp: constant
    assert ramp(2.0, 10, 0) == pytest.approx(2.0 * math.exp(-5))
    assert ramp(2.0, 10, 5) == pytest.approx(2.0 * math.exp(-5 / 4))
    assert ramp(2.0, 10, 10) == ramp(2.0, 10, 30) == 2.0


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=ce", "method.consistency_lambda=1"],  # no second view
        ["method.name=con_elr", "method.lambda_con=0", "method.consistency_lambda=1"],
        ["method.consistency_threshold=0"],
    ],
)
def test_it_is_refused_where_there_is_no_second_view_to_teach(overrides):
    with pytest.raises(ConfigError, match="method.consistency_"):
        load_config(None, overrides).validate()


@pytest.mark.parametrize("epoch", [0, 12, 40])
def test_the_step_adds_the_ramped_term_on_its_own_two_views(epoch):
    """The default's step with consistency = the step without + ramp(λ) x the loss of the
    second view's logits against the first view's confident predictions."""
    overrides = ["method.name=con_elr", "model.backbone=test_resnet"]
    plain = load_config(None, overrides)
    with_it = load_config(None, [*overrides, "method.consistency_lambda=2"])
    with_it.method.consistency_threshold = 0.5  # every prediction of two classes is confident
    torch.manual_seed(0)
    net = build_model(plain.model, "con_elr", num_classes=2, in_chans=1)
    views = torch.randn(2, 8, 1, 32, 32)
    batch = {
        "view1": views[0],
        "view2": views[1],
        "label": torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]),
        "valid": torch.tensor([True] * 7 + [False]),
        "memory": torch.rand(8, 4),
    }
    out = training_step(net, batch, with_it.method, epoch, 2, 0.0)
    base = training_step(net, batch, plain.method, epoch, 2, 0.0)
    # the step encodes both views in one batch (one set of batch-norm statistics), as here
    logits1, logits2 = net.classifier(net.encoder(views.flatten(0, 1))).chunk(2)
    expected = losses.confident_consistency(logits1, logits2, 0.5, batch["valid"])
    assert expected.item() > 0
    torch.testing.assert_close(out.terms["cons"], expected)
    weight = ramp(2.0, 30, epoch)
    torch.testing.assert_close(out.loss, base.loss + weight * expected)

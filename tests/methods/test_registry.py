"""The method registry, its presets and implied values; input mixup's reported logits; the
Co-teaching forget rate; hidden labels."""

from __future__ import annotations

import typing

import pytest
import torch
from conftest import CONFIGS
from torch import nn

from dtrain.config import load_config
from dtrain.errors import ConfigError
from dtrain.methods.model import build_model
from dtrain.methods.registry import METHODS, MethodName
from dtrain.methods.steps import forget_rate, training_step


def test_afm_implies_feature_attention_unless_set():
    assert load_config(None, ["method.name=afm"]).model.attention_inputs == "feature"
    explicit = load_config(None, ["method.name=afm", "model.attention_inputs=feature+label"])
    assert explicit.model.attention_inputs == "feature+label"
    assert load_config(None, []).model.attention_inputs == "feature+label+confidence"
    assert load_config(None, ["method.name=iam"]).model.attention_inputs == (
        "feature+label+confidence"
    )


def test_the_method_with_elr_ramps_its_weight_unless_set_and_elr_keeps_the_papers():
    assert load_config(None, ["method.name=iam_elr"]).method.elr_rampup_epochs == 30
    explicit = load_config(None, ["method.name=iam_elr", "method.elr_rampup_epochs=0"])
    assert explicit.method.elr_rampup_epochs == 0
    assert load_config(None, ["method.name=elr"]).method.elr_rampup_epochs == 0


def test_registry_and_presets_agree():
    presets = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert presets == sorted(METHODS)
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.preset == (CONFIGS / f"{name}.yaml").resolve()
        config = load_config(spec.preset)
        config.validate()
        assert config.method.name == name
    assert typing.get_args(MethodName) == tuple(METHODS)


def test_mixup_reports_eval_mode_logits_on_the_unmixed_view():
    config = load_config(None, ["method.name=mixup", "model.backbone=test_resnet"])
    torch.manual_seed(0)
    net = build_model(config.model, "mixup", num_classes=3, in_chans=1)
    net.train()
    batch = {
        "view1": torch.randn(8, 1, 32, 32),
        "view2": torch.randn(8, 1, 32, 32),
        "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
        "valid": torch.ones(8, dtype=torch.bool),
    }
    out = training_step(net, batch, config.method, 1, 3, 0.0)
    assert net.training and all(m.training for m in net.modules())
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    net.eval()
    with torch.no_grad():
        expected = net(batch["view1"])
    torch.testing.assert_close(out.logits, expected)
    expected_ce = nn.functional.cross_entropy(expected, batch["label"], reduction="none")
    torch.testing.assert_close(out.sample_loss, expected_ce)


def meta(model: str, nominal: float, realised: float) -> dict:
    return {
        "noise": {"model": model, "rate": nominal},
        "splits": {"train": {"noise_rate": realised}},
    }


def test_forget_rate_explicit_then_nominal_never_realised():
    symmetric = meta("symmetric", 0.4, 0.37)
    explicit = load_config(None, ["method.name=coteaching", "method.coteaching_forget_rate=0.25"])
    assert forget_rate(explicit, symmetric) == 0.25
    assert forget_rate(explicit, meta("none", 0.0, 0.0)) == 0.25
    zero = load_config(None, ["method.name=coteaching", "method.coteaching_forget_rate=0"])
    assert forget_rate(zero, symmetric) == 0.0  # an explicit 0 is a value, not "unset"
    nominal = load_config(None, ["method.name=coteaching"])
    assert forget_rate(nominal, symmetric) == 0.4
    with pytest.raises(ConfigError, match="method.coteaching_forget_rate"):
        forget_rate(nominal, meta("none", 0.0, 0.0))
    reviewed = {**symmetric, "relabel": {"changed": 197}}  # the prepared rate no longer holds
    with pytest.raises(ConfigError, match="relabelled after a review"):
        forget_rate(nominal, reviewed)
    assert forget_rate(explicit, reviewed) == 0.25


@pytest.mark.parametrize("name", [n for n, spec in METHODS.items() if spec.unlabelled])
def test_a_hidden_label_leaves_the_ce_and_nothing_else_reads_it(name):
    """What a cross-fitted round's fold model relies on: label -1 is unseen, and the CE term is
    the mean over the labelled samples alone."""
    config = load_config(None, [f"method.name={name}", "model.backbone=test_resnet"])
    torch.manual_seed(0)
    net = build_model(config.model, name, num_classes=2, in_chans=1)
    views = torch.randn(2, 8, 1, 32, 32)
    memory = torch.rand(8, 4)

    def step(label: list[int]):
        batch = {
            "view1": views[0],
            "view2": views[1],
            "label": torch.tensor(label),
            "valid": torch.ones(8, dtype=torch.bool),
            "memory": memory,
        }
        torch.manual_seed(1)  # the same step each time
        return training_step(net, batch, config.method, 12, 2, 0.0)

    shown = [0, 1, 1, 0, 1, 0, 0, 1]
    hidden = step(shown[:4] + [-1] * 4)
    torch.testing.assert_close(hidden.terms["ce"], step(shown).sample_loss[:4].mean())
    everyone = step(shown)
    assert not torch.allclose(everyone.terms["ce"], hidden.terms["ce"])

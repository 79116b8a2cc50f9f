"""Config coercion and identity: Literal choices, the nearest key suggested, operational keys."""

from __future__ import annotations

import pytest

from dtrain.config import load_config, operational_keys
from dtrain.errors import ConfigError


def test_literal_choices_are_enforced():
    with pytest.raises(ConfigError, match=r"model\.stem='big'.*imagenet.*small"):
        load_config(None, ["model.stem=big"])
    assert load_config(None, ["model.stem=small"]).model.stem == "small"


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("method.group_sise=4", "method.group_size"),
        ("data.batchsize=8", "data.batch_size"),
        ("optim.warmup_epoch=2", "optim.warmup_epochs"),
    ],
)
def test_unknown_key_suggests_the_nearest(override, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean {suggestion}\?"):
        load_config(None, [override])


def dotted(values: dict) -> set[str]:
    return {f"{section}.{key}" for section, entries in values.items() for key in entries}


def test_identity_drops_exactly_the_operational_keys():
    config = load_config(None, [])
    expected = {
        "optim.lr",
        "optim.warmup_epochs",
        "optim.grad_clip",
        "train.log_every",
        "train.progress",
        "train.max_nonfinite_steps",
        "train.stop_after_steps",
        "train.checkpoint_every_steps",
        "train.checkpoint_every_minutes",
        "train.dist_timeout_s",
        "train.compile",
        "train.channels_last",
        "train.trackers",
    }
    assert set(operational_keys()) == expected
    assert dotted(config.to_dict()) - dotted(config.identity()) == expected
    assert dotted(config.identity()) <= dotted(config.to_dict())
    # an operational change leaves the identity alone, any other change does not
    assert load_config(None, ["optim.lr=0.3"]).identity() == config.identity()
    assert load_config(None, ["method.group_size=4"]).identity() != config.identity()

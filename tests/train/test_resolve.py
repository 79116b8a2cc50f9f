"""`resolve(config)`: the config resolved once before anything is built, DeepSpeed file included,
on a copy: the caller's config is never changed, and what comes out is validated."""

from __future__ import annotations

import json

import pytest
from conftest import CONFIGS

from dtrain.config import load_config
from dtrain.errors import ConfigError
from dtrain.train.resolve import ResolvedRun, resolve


def test_the_deepspeed_file_is_resolved_into_a_copy(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}))
    given = load_config(None, [f"train.deepspeed={path}"])
    before = given.to_dict()
    run = resolve(given)
    assert isinstance(run, ResolvedRun) and run.precision == "fp32"  # the CPU's
    assert run.config.optim.grad_clip == 1.0 and run.deepspeed.stage == 2
    assert given.to_dict() == before  # the caller's config is untouched
    with pytest.raises(AttributeError):  # nothing changes the resolved run afterwards
        run.precision = "bf16"


def test_a_round_gets_the_same_run_in_its_own_folder(tmp_path):
    run = resolve(load_config(CONFIGS / "ce.yaml", [f"train.run_dir={tmp_path / 'run'}"]))
    moved = run.with_run_dir(str(tmp_path / "run" / "rounds" / "0"))
    assert moved.config.run_path == tmp_path / "run" / "rounds" / "0"
    assert run.config.run_path == tmp_path / "run"
    a, b = moved.config.to_dict(), run.config.to_dict()
    a["train"].pop("run_dir"), b["train"].pop("run_dir")
    assert a == b and moved.precision == run.precision


def test_a_bad_value_is_refused_before_anything_is_read(tmp_path):
    config = load_config(None, ["method.name=iam", "data.batch_size=30", "method.group_size=8"])
    with pytest.raises(ConfigError, match="group_size"):
        resolve(config)

"""`data.train_labels=clean`: the study's ceiling trains on the clean labels a benchmark set keeps
beside the given ones; a dataset without any is refused, naming the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_overrides, stripes_dataset

from dtrain.config import load_config
from dtrain.dataset.format import split_urls
from dtrain.dataset.loader import make_loader
from dtrain.errors import ConfigError
from dtrain.prepare import PrepareConfig, prepare
from dtrain.train import train


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("labels"), 40, shard_size=16)


def labels(dataset: Path, clean_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loader = make_loader(
        split_urls(dataset, "train"),
        train=True,
        batch_size=8,
        image_size=24,
        clean_labels=clean_labels,
    )
    batches = [b for b in loader]
    valid = torch.cat([b["valid"] for b in batches])
    given = torch.cat([b["label"] for b in batches])[valid]
    return given, torch.cat([b["clean_label"] for b in batches])[valid]


def test_the_loader_hands_out_the_clean_labels_when_asked(noisy):
    given, clean = labels(noisy, clean_labels=False)
    assert (given != clean).any()  # the set's 20% noise
    given, clean = labels(noisy, clean_labels=True)
    assert torch.equal(given, clean)


def test_a_dataset_without_clean_labels_is_refused_by_name(noisy, tmp_path):
    plain = prepare(
        PrepareConfig(
            source=str(noisy.parent / "img"),
            out=str(tmp_path / "plain"),
            shard_size=16,
            progress=False,
        )
    )
    config = load_config(
        None, small_overrides(plain, tmp_path / "run", 16, "data.train_labels=clean")
    )
    with pytest.raises(ConfigError, match=rf"data.train_labels=clean .*{plain}"):
        train(config)

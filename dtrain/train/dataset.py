"""Dataset folders written by `dtrain prepare`: their `dataset.json`, the shards of a split, the
samples in them, and which folder a run trains on."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import webdataset as wds

from dtrain.errors import DataError
from dtrain.train.shards import RawSample
from dtrain.train.transforms import decode_image


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern (`train-{000000..000009}.tar`), `::`-separated patterns, or a list."""
    if isinstance(urls, (str, os.PathLike)):
        return list(wds.shardlists.expand_urls(str(urls)))
    return [u for url in urls for u in wds.shardlists.expand_urls(str(url))]


def split_urls(dataset_dir: str | Path, split: str) -> list[str]:
    """The shards of one split of a `dtrain prepare` folder, in order."""
    meta = read_dataset_json(str(dataset_dir))
    names = sorted(n for n, info in meta["shards"].items() if info["split"] == split)
    if not names:
        raise DataError(f"{dataset_dir} has no {split} shards")
    return [str(Path(dataset_dir) / n) for n in names]


def dataset_splits(meta: dict) -> list[str]:
    """The splits a prepared dataset has shards for, in train, val, test order."""
    present = {info["split"] for info in meta["shards"].values()}
    return [split for split in ("train", "val", "test") if split in present]


def training_splits(dataset_dir: str | Path, meta: dict) -> list[str]:
    """`dataset_splits` of a dataset to train on: a test-only one is refused."""
    splits = dataset_splits(meta)
    if "train" not in splits:
        raise DataError(
            f"{dataset_dir} has no train split: it is test-only; use it with "
            f"`dtrain eval RUN --data {dataset_dir}`"
        )
    return splits


def shard_dir(shard_url: str) -> str:
    return shard_url.rsplit("/", 1)[0] if "/" in shard_url else "."


def read_dataset_json(base: str) -> dict:
    """The `dataset.json` of a dataset folder, local or at any URL webdataset can open."""
    url = f"{base}/dataset.json"
    try:
        with wds.gopen(url) as stream:
            return json.loads(stream.read())
    except Exception as err:  # gopen raises OSError, ValueError or a pipe error by scheme
        raise DataError(
            f"cannot read {url} ({err}); pass shard_counts= for shards that `dtrain prepare` "
            "did not write, or use resampled mode"
        ) from err


IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")


class CorruptSampleError(DataError):
    """A sample that cannot be used: its image, label or record does not decode, its damaged
    shard lost it, or its member names are ones no dtrain shard holds."""


def decode_sample(sample: RawSample, num_classes: int | None, channels: int, min_side: int) -> dict:
    """A raw sample's image (PIL, decoded at `min_side`), label, clean label and key; a
    CorruptSampleError naming the shard and the member otherwise."""
    if sample.problem:
        raise CorruptSampleError(sample.problem)
    members, member = sample.members, f"{sample.url} member {sample.key}"
    image_keys = [k for k in IMAGE_EXTS if k in members]
    if not image_keys:
        raise CorruptSampleError(
            f"{sample.url} sample {sample.key}: no image member ({', '.join(IMAGE_EXTS)})"
        )
    if "cls" not in members:
        raise CorruptSampleError(f"{sample.url} sample {sample.key}: no .cls label")
    try:
        label = int(members["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptSampleError(f"{member}.cls: not an integer label") from err
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise CorruptSampleError(f"{member}.cls: label {label} is outside [0, {num_classes})")
    try:
        record = json.loads(members["json"]) if "json" in members else {}
        clean_label = int(record.get("clean_label", label))
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        raise CorruptSampleError(f"{member}.json: not a dtrain sample record ({err})") from err
    if clean_label < 0 or (num_classes is not None and clean_label >= num_classes):
        raise CorruptSampleError(
            f"{member}.json: clean_label {clean_label} is outside [0, {num_classes})"
        )
    try:
        image = decode_image(members[image_keys[0]], channels, min_side)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise CorruptSampleError(f"{member}.{image_keys[0]}: cannot decode ({err})") from err
    return {"image": image, "label": label, "clean_label": clean_label, "key": sample.key}


def resolve_data_dir(path: str, progress: bool) -> Path:
    """The dataset folder `path`, which must hold a `dataset.json`; or, when `path` is empty, the
    embedded Br35H set, prepared by rank 0 if missing while the other ranks wait for it."""
    if path:
        folder = Path(path)
        if not (folder / "dataset.json").is_file():
            raise DataError(
                f"data.path={folder} holds no dataset.json; create it with `dtrain prepare`"
            )
        return folder
    from dtrain.distributed import world
    from dtrain.prepare import PrepareConfig, default_out, prepare
    from dtrain.prepare.sources import from_embedded

    prep = PrepareConfig(progress=progress)
    folder = default_out(prep, from_embedded())
    rank, size = world()
    if rank == 0:
        prepare(prep)  # a no-op when the folder already holds this exact dataset
    if size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return folder

"""Dataset folders written by `dtrain prepare`: their `dataset.json`, the shards of a split, the
samples in them (`dtrain.prepare.data_folder` says which folder a run trains on)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds

from dtrain.dataset.shard_reader import RawSample
from dtrain.dataset.transforms import decode_image
from dtrain.errors import DataError


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern (`train-{000000..000009}.tar`), `::`-separated patterns, or a list."""
    if isinstance(urls, (str, os.PathLike)):
        return list(wds.shardlists.expand_urls(str(urls)))
    return [u for url in urls for u in wds.shardlists.expand_urls(str(url))]


def split_urls(dataset_dir: str | Path, split: str) -> list[str]:
    """The shards of one split of a dataset folder, in order: beside its `dataset.json`
    (`dtrain prepare`) or at the URL recorded for each (`dtrain index`)."""
    meta = read_dataset_json(str(dataset_dir))
    names = sorted(n for n, info in meta["shards"].items() if info["split"] == split)
    if not names:
        raise DataError(f"{dataset_dir} has no {split} shards")
    urls = [meta["shards"][n].get("url", str(Path(dataset_dir) / n)) for n in names]
    for url in urls:
        check_command_url(url, f"{dataset_dir}/dataset.json")
    return urls


def check_command_url(url: str, where: str) -> None:
    """A `pipe:` URL runs a shell command: one read from a dataset folder (which may have come
    from anyone) runs only when the user says they trust it."""
    if url.startswith("pipe:") and os.environ.get(ALLOW_PIPE_ENV) != "1":
        raise DataError(
            f"{where} lists the shard URL {url!r}, which runs a shell command; if you trust "
            f"this dataset, set {ALLOW_PIPE_ENV}=1"
        )


def check_shard_names(meta: dict, where: str) -> None:
    """Shard names are file names inside the dataset folder, never paths out of it."""
    for name in meta.get("shards", {}):
        if not SHARD_NAME.fullmatch(name):
            raise DataError(f"{where}: shard name {name!r} is not a plain file name")


def shard_entries(meta: dict, urls: list[str]) -> dict[str, dict]:
    """The entries of `meta["shards"]` that list the shards `urls`, by URL: the one recorded with
    that URL (`dtrain index`), else the one named like its file (a shard beside its
    `dataset.json`). Shards not listed are left out."""
    by_url = {info["url"]: info for info in meta["shards"].values() if "url" in info}
    by_name = {name: info for name, info in meta["shards"].items() if "url" not in info}
    found = {url: by_url.get(url) or by_name.get(url.rsplit("/", 1)[-1]) for url in urls}
    return {url: info for url, info in found.items() if info is not None}


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


ALLOW_PIPE_ENV = "DTRAIN_ALLOW_PIPE"
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def read_dataset_json(base: str) -> dict:
    """The `dataset.json` of a dataset folder, local or at any URL webdataset can open."""
    url = f"{base}/dataset.json"
    try:
        with wds.gopen(url) as stream:
            meta = json.loads(stream.read())
    except Exception as err:  # gopen raises OSError, ValueError or a pipe error by scheme
        raise DataError(
            f"cannot read {url} ({err}); pass shard_counts= for shards that `dtrain prepare` "
            "did not write, or use resampled mode"
        ) from err
    check_shard_names(meta, url)
    return meta


# the image members a sample may hold (any format PIL decodes; the first one present is used)
IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "ppm", "pgm", "pbm", "pnm", "gif")


def raw_label(members: dict[str, bytes], label_key: str) -> int | str:
    """The label a sample holds under `label_key`: member `EXT` (text, e.g. `cls`) or a field of
    JSON member `EXT:FIELD` (e.g. `json:label`); an index or a class name. ValueError saying
    why when there is none."""
    member, _, field_name = label_key.partition(":")
    member = member.lower()  # as `shard_reader.py` stores member extensions
    if member not in members:
        raise ValueError(f"no .{member} member")
    try:
        text = members[member].decode()
        value = json.loads(text) if field_name else text.strip()
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f".{member} is not {'JSON' if field_name else 'text'} ({err})") from None
    if field_name:
        if not isinstance(value, dict) or field_name not in value:
            raise ValueError(f".{member} has no {field_name!r} field")
        value = value[field_name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ValueError(f"{label_key} holds {value!r}, neither a class index nor a class name")
    return value


def label_index(value: int | str, classes: list[str] | None) -> int:
    """A label as a class index: a name of `classes`, else an integer (digits) within them."""
    if isinstance(value, str):
        if classes is not None and value in classes:
            return classes.index(value)
        if not value.lstrip("-").isdigit():
            raise ValueError(f"label {value!r} is not one of the classes {classes}")
        value = int(value)
    if value < 0 or (classes is not None and value >= len(classes)):
        bound = "" if classes is None else f" of the {len(classes)} classes {classes}"
        raise ValueError(f"label {value} is not a class index{bound}")
    return value


class CorruptSampleError(DataError):
    """A sample that cannot be used: its image, label or record does not decode, its damaged
    shard lost it, or its member names are ones no dtrain shard holds."""


def decode_sample(
    sample: RawSample,
    num_classes: int | None,
    channels: int,
    min_side: int,
    label_key: str | None = None,
    classes: list[str] | None = None,
) -> dict:
    """A raw sample's image (PIL, decoded at `min_side`), label, clean label, key and
    near-duplicate group (-1 where the shards do not record it); a
    CorruptSampleError naming the shard and the member otherwise. Shards of `dtrain prepare`
    hold `.cls` and a `.json` record with the clean label; shards indexed with `dtrain index`
    hold their label under `label_key` (`raw_label`), an index or a name of `classes`, and
    have no clean label but that one."""
    if sample.problem:
        raise CorruptSampleError(sample.problem)
    members, member = sample.members, f"{sample.url} member {sample.key}"
    image_keys = [k for k in IMAGE_EXTS if k in members]
    if not image_keys:
        raise CorruptSampleError(
            f"{sample.url} sample {sample.key}: no image member ({', '.join(IMAGE_EXTS)})"
        )
    if label_key is not None:
        try:
            label = clean_label = label_index(raw_label(members, label_key), classes)
        except ValueError as err:
            raise CorruptSampleError(f"{sample.url} sample {sample.key}: {err}") from err
        return {
            "image": _decode_member(members, image_keys[0], member, channels, min_side),
            "label": label,
            "clean_label": clean_label,
            "key": sample.key,
        }
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
        group = int(record.get("group", -1))
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        raise CorruptSampleError(f"{member}.json: not a dtrain sample record ({err})") from err
    if clean_label < 0 or (num_classes is not None and clean_label >= num_classes):
        raise CorruptSampleError(
            f"{member}.json: clean_label {clean_label} is outside [0, {num_classes})"
        )
    image = _decode_member(members, image_keys[0], member, channels, min_side)
    return {
        "image": image,
        "label": label,
        "clean_label": clean_label,
        "key": sample.key,
        "group": group,
    }


def _decode_member(members: dict, ext: str, member: str, channels: int, min_side: int):
    try:
        return decode_image(members[ext], channels, min_side)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise CorruptSampleError(f"{member}.{ext}: cannot decode ({err})") from err

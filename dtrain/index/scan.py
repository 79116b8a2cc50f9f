"""Indexing shards written elsewhere. Each shard is read once to its end, as the loader will
stream it: its exact sample count, its sha256 (the loader checks it as it streams, so a shard
changed since is refused), each sample's key and label. A few images spread over the shards
decide grayscale or colour. The folder gets the `dataset.json` (with each shard's URL) and
`manifest.parquet` that `dtrain train` reads; the shards stay where they are.

Shards are read by threads of this process (their I/O and hashing release the GIL; a network
store is read many shards at once), or as tasks on a Ray cluster (`engine="ray"`: prepare's
engine, each node reading the shards it is handed)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dtrain.dataset.format import IMAGE_EXTS, expand_urls, label_index, raw_label
from dtrain.dataset.shard_reader import ShardScan
from dtrain.errors import ConfigError, DataError
from dtrain.prepare.dedup import BadImageError, is_grayscale
from dtrain.prepare.engines import run_tasks
from dtrain.prepare.folder import new_staging, publish
from dtrain.prepare.prepare_config import FORMAT_VERSION
from dtrain.prepare.records import (
    DATASET_JSON,
    print_summary,
    split_stats,
    write_description,
    write_manifest,
)
from dtrain.prepare.split import SPLITS

CHANNEL_SAMPLES = 32  # images decoded to tell grayscale from colour, spread over the shards
IndexEngine = Literal["thread", "ray"]


@dataclass
class ShardIndex:
    """What one read of a shard found: its samples' keys (an Arrow array: a million keys as
    Python strings take a hundred megabytes) and labels (as stored, then class indices), its
    digest, and how many of the images decoded for the channel count were grayscale."""

    url: str
    split: str
    keys: pa.Array
    labels: list[int | str] | np.ndarray
    sha256: str
    grayscale: int
    decoded: int


def shard_urls(pattern: str) -> list[str]:
    """The shards a pattern names, expanded as webdataset does; local paths (no URL scheme, as
    `webdataset.gopen` tells them) made absolute, so that training may run from any folder."""
    return [u if urlparse(u).scheme else str(Path(u).resolve()) for u in expand_urls(pattern)]


def scan_shard(url: str, split: str, label_key: str, images_to_decode: int) -> ShardIndex:
    """Read shard `url` to its end; a DataError names the shard and sample that cannot be used."""
    scan = ShardScan(url)
    keys: list[str] = []
    labels: list[int | str] = []
    distinct: dict[int | str, int | str] = {}  # one object per label value, not per sample
    grayscale = decoded = 0
    for sample in scan:
        if sample.problem:
            raise DataError(sample.problem)
        where = f"shard {url} sample {sample.key}"
        images = [ext for ext in IMAGE_EXTS if ext in sample.members]
        if not images:
            raise DataError(f"{where}: no image member (.{', .'.join(IMAGE_EXTS)})")
        try:
            label = raw_label(sample.members, label_key)
            labels.append(distinct.setdefault(label, label))
        except ValueError as err:
            raise DataError(
                f"{where}: {err}; --label-key {label_key} names the label's member"
            ) from err
        keys.append(sample.key)
        if decoded < images_to_decode:
            try:
                grayscale += is_grayscale(sample.members[images[0]])
            except BadImageError as err:
                raise DataError(f"{where}: cannot decode its .{images[0]} ({err})") from err
            decoded += 1
    if not keys:
        raise DataError(f"shard {url} holds no samples")
    return ShardIndex(
        url, split, pa.array(keys, pa.string()), labels, scan.sha256, grayscale, decoded
    )


def _scan_task(reading: tuple[str, int], task: tuple[str, str]) -> ShardIndex:
    """One shard as a task of prepare's engines: `reading` is (label key, images to decode)."""
    return scan_shard(*task, *reading)


def _scan_all(
    tasks: list[tuple[str, str]],
    label_key: str,
    jobs: int,
    progress: bool,
    engine: IndexEngine = "thread",
    address: str = "",
) -> list[ShardIndex]:
    """Every shard scanned, `jobs` at a time, in order; the first shard in order that fails
    raises."""
    from tqdm.auto import tqdm

    reading = (label_key, -(-CHANNEL_SAMPLES // len(tasks)))
    pool = ThreadPoolExecutor(max_workers=jobs) if engine == "thread" else None
    try:
        if pool is None:
            scans = run_tasks(_scan_task, reading, tasks, "ray", jobs, address)
        else:
            scans = pool.map(lambda task: _scan_task(reading, task), tasks)
        return list(
            tqdm(scans, total=len(tasks), desc="indexing", unit="shard", disable=not progress)
        )
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _class_indices(scans: list[ShardIndex], classes: list[str] | None) -> list[str]:
    """The class names (`classes`, else the sorted names found, else "0".."max" for indices);
    each scan's labels become an array of indices in place (each distinct value looked up
    once)."""
    if classes is None:
        found = {v for s in scans for v in s.labels}
        names = {v for v in found if isinstance(v, str) and not v.lstrip("-").isdigit()}
        if names and len(names) < len(found):
            number = next(v for v in found if v not in names)
            raise DataError(
                f"the labels mix class names ({sorted(names)[0]!r}) and indices ({number!r}); "
                "give --classes to say which index each name has"
            )
        classes = sorted(names) or [str(i) for i in range(max(int(v) for v in found) + 1)]
    for scan in scans:
        index: dict[int | str, int] = {}
        for i, value in enumerate(scan.labels):
            if value not in index:
                try:
                    index[value] = label_index(value, classes)
                except ValueError as err:
                    raise DataError(
                        f"shard {scan.url} sample {scan.keys[i].as_py()}: {err}"
                    ) from err
        scan.labels = np.fromiter((index[v] for v in scan.labels), np.int64, len(scan.labels))
    return classes


def _check_unique(scans: list[ShardIndex]) -> None:
    """Keys name samples in the manifest, the scores and the checkpoints: one shard per key
    (counted in Arrow; the keys become Python strings only to name a repeated one)."""
    keys = pa.chunked_array([s.keys for s in scans], pa.string())
    if pc.count_distinct(keys).as_py() == len(keys):
        return
    where: dict[str, str] = {}
    for scan in scans:
        for key in scan.keys.to_pylist():
            if key in where:
                raise DataError(
                    f"key {key!r} is in shard {where[key]} and in shard {scan.url}: every sample "
                    "needs its own key (the same shard given twice?)"
                )
            where[key] = scan.url


def _check_out(out: Path, request: dict, overwrite: bool) -> None:
    """Re-indexing the same shards into `out` replaces it; another dataset there only with
    `overwrite`; a folder that is not a dtrain dataset is never touched."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; choose a folder with --out")
    meta_path = out / DATASET_JSON
    if meta_path.is_file():
        try:
            same = json.loads(meta_path.read_text()).get("request") == request
        except (ValueError, AttributeError):
            same = False
        if not same and not overwrite:
            raise DataError(
                f"{out} holds another dataset; pass --overwrite to replace it or choose another "
                "--out"
            )
    elif out.exists() and any(out.iterdir()):
        raise DataError(
            f"output folder {out} is not empty and holds no {DATASET_JSON}: it is not a dtrain "
            "dataset, so it is left alone; choose another --out"
        )


def _check_label_key(label_key: str) -> None:
    member, colon, field_name = label_key.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9_]+", member) or (colon and not field_name):
        raise ConfigError(
            f"--label-key {label_key!r} must be a member's extension (cls) or a JSON member's "
            "field (json:label)"
        )
    if member.lower() in IMAGE_EXTS:
        raise ConfigError(f"--label-key {label_key!r} names an image member")


def index_shards(
    patterns: dict[str, str],
    out: Path,
    label_key: str = "cls",
    classes: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    jobs: int = 8,
    engine: IndexEngine = "thread",
    address: str = "",
) -> Path:
    """Index the shards each split's pattern names (`{"train": ..., "val": ...}`) into the
    dataset folder `out` and return it; `jobs` threads or Ray workers read them."""
    _check_label_key(label_key)
    if classes is not None and (not classes or len(set(classes)) < len(classes)):
        raise ConfigError(f"--classes {','.join(classes)} must name each class once")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1")
    if address and engine != "ray":
        raise ConfigError(f"--address {address} joins a Ray cluster: add --engine ray")
    out = Path(out)
    request = {
        "patterns": patterns,
        "label_key": label_key,
        "classes": classes,
        "format_version": FORMAT_VERSION,
    }
    _check_out(out, request, overwrite)
    tasks, listed = [], {}
    for split in SPLITS:
        if split not in patterns:
            continue
        urls = shard_urls(patterns[split])
        if not urls:
            raise DataError(f"{split} pattern {patterns[split]!r} names no shards")
        for url in urls:
            if url in listed:
                raise DataError(f"shard {url} is given twice ({listed[url]} and {split})")
            listed[url] = split
            tasks.append((url, split))
    inside = [u for u in listed if not urlparse(u).scheme and Path(u).is_relative_to(out.resolve())]
    if inside:  # the folder is replaced as a whole: the shards would go with it
        raise DataError(
            f"shard {inside[0]} lies inside --out {out}, which dtrain index writes anew; "
            "index into a folder of its own"
        )

    scans = _scan_all(tasks, label_key, jobs, progress, engine, address)
    _check_unique(scans)
    classes = _class_indices(scans, classes)
    meta = _describe(out.name, scans, classes, request)
    counts = [len(scan.keys) for scan in scans]
    labels = np.concatenate([scan.labels for scan in scans])
    columns = {  # column by column: a Python dict per sample would take gigabytes at 1M
        "key": pa.chunked_array([scan.keys for scan in scans], pa.string()),
        "shard": pa.chunked_array(
            [pa.repeat(name, count) for name, count in zip(meta["shards"], counts, strict=True)]
        ),
        "split": pa.chunked_array(
            [pa.repeat(scan.split, count) for scan, count in zip(scans, counts, strict=True)]
        ),
        "clean_label": labels,
        "noisy_label": labels,
        "is_noisy": np.zeros(len(labels), bool),
        "group": np.arange(len(labels)),
        "source": pa.chunked_array(
            [pc.binary_join_element_wise(scan.url, scan.keys, "#") for scan in scans], pa.string()
        ),
    }
    staging = new_staging(out)
    write_manifest(staging, columns)
    write_description(staging, meta)
    publish(staging, out)
    print_summary(out, meta)
    return out


def _describe(name: str, scans: list[ShardIndex], classes: list[str], request: dict) -> dict:
    """The contents of `dataset.json`, as `dtrain prepare` writes it where it applies; shards
    are named `<split>-<n>` in the patterns' order and carry their `url`."""
    shards, numbered = {}, dict.fromkeys(SPLITS, 0)
    for scan in scans:
        shards[f"{scan.split}-{numbered[scan.split]:06d}"] = {
            "split": scan.split,
            "count": len(scan.keys),
            "sha256": scan.sha256,
            "url": scan.url,
        }
        numbered[scan.split] += 1
    per_split = {}
    for split in SPLITS:
        labels = np.concatenate(
            [np.empty(0, np.int64), *(s.labels for s in scans if s.split == split)]
        )
        per_split[split] = split_stats(labels, labels, np.arange(len(labels)), len(classes))
    decoded = sum(s.decoded for s in scans)
    grayscale = sum(s.grayscale for s in scans)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "classes": classes,
        "source": {"kind": "shards", "patterns": request["patterns"]},
        "label_key": request["label_key"],
        "images": {
            "channels": 1 if grayscale >= 0.95 * decoded else 3,
            "grayscale_fraction": round(grayscale / decoded, 4),
            "decoded": decoded,
        },
        "noise": {"model": "none", "rate": 0.0},
        "splits": per_split,
        "shards": shards,
        "request": request,
    }

"""WebDataset tar shards: one split's samples in a fixed order, cut by sample count or file size.

Every byte is a function of the rows and the images (mtime 0, sorted JSON keys), so that a rerun
writes identical files and `dataset.json` can hold checksums worth comparing. Where each shard
starts is planned before any is written, so that shards are written in parallel, by any engine,
to the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtrain.dataset.images import open_image
from dtrain.prepare.sources import Source

TAR_BLOCK = 512


def resize_image(data: bytes, ext: str, side: int) -> tuple[bytes, str]:
    """Shorter side to `side` pixels; JPEG stays JPEG (quality 95), anything else becomes PNG."""
    from PIL import Image

    image = open_image(data)
    scale = side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image.draft(None, size)
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    if ext == "jpg":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            buffer, format="JPEG", quality=95
        )
        return buffer.getvalue(), "jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def key_of(index: int) -> str:
    """A sample's key: its index in the source."""
    return f"s{index:07d}"


@dataclass
class Rows:
    """The dataset's rows in shard order, one array per field: the source index, the split, the
    clean and noisy labels, the group."""

    index: np.ndarray
    split: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray
    group: np.ndarray

    def record(self, row: int, source: Source) -> tuple[str, dict]:
        """The key and the `.json` record of one row."""
        index = int(self.index[row])
        return key_of(index), {
            "clean_label": int(self.clean[row]),
            "noisy_label": int(self.noisy[row]),
            "source": source.paths[index],
            "group": int(self.group[row]),
        }


def sample_of(key: str, record: dict, data: bytes, ext: str) -> dict:
    return {
        "__key__": key,
        ext: data,
        "cls": str(record["noisy_label"]).encode(),
        "json": json.dumps(record, sort_keys=True).encode(),
    }


def _padded(nbytes: int) -> int:
    return TAR_BLOCK + -(-nbytes // TAR_BLOCK) * TAR_BLOCK


@dataclass(frozen=True)
class ShardSpec:
    """One shard to write: rows `start..stop` of the dataset's `Rows`."""

    name: str
    split: str
    start: int
    stop: int


def plan_shards(
    split: str,
    start: int,
    sample_bytes: np.ndarray,
    shard_size: int,
    shard_bytes: int | None,
) -> list[ShardSpec]:
    """One split's shards over rows `start..start + len(sample_bytes)`: a new shard begins when
    the next sample would pass `shard_size` samples or `shard_bytes` file bytes (tar's final
    record padding aside; a sample larger than the limit gets a shard of its own)."""
    specs, first, size = [], 0, 2 * TAR_BLOCK  # the end-of-archive blocks
    for i, nbytes in enumerate(sample_bytes.tolist()):
        full = i - first >= shard_size or (
            shard_bytes is not None and i > first and size + nbytes > shard_bytes
        )
        if full:
            specs.append((first, i))
            first, size = i, 2 * TAR_BLOCK
        size += nbytes
    if len(sample_bytes):
        specs.append((first, len(sample_bytes)))
    return [
        ShardSpec(f"{split}-{n:06d}.tar", split, start + a, start + b)
        for n, (a, b) in enumerate(specs)
    ]


def sample_bytes(
    rows: Rows, start: int, stop: int, payload: np.ndarray, source: Source
) -> np.ndarray:
    """What each of rows `start..stop` adds to a tar file: a header block per member plus its
    padded payload (`payload`: the image bytes per row)."""
    sizes = np.empty(stop - start, np.int64)
    for i, row in enumerate(range(start, stop)):
        key, record = rows.record(row, source)
        sample = sample_of(key, record, b"", "img")
        sizes[i] = (
            _padded(int(payload[i])) + _padded(len(sample["cls"])) + _padded(len(sample["json"]))
        )
    return sizes


@dataclass
class ShardJob:
    """What every shard-writing worker holds: the source, the rows, where and how to write."""

    source: Source
    rows: Rows
    folder: str
    resize: int | None


def write_shard(job: ShardJob, spec: ShardSpec) -> dict:
    """One task: write a shard; its size and SHA-256 digest come back."""
    import webdataset as wds

    path = Path(job.folder) / spec.name
    # integer mtime: a float one makes tarfile add a PAX header to every member
    with wds.TarWriter(str(path), mtime=0) as writer:
        for row in range(spec.start, spec.stop):
            key, record = job.rows.record(row, job.source)
            data, ext = job.source.read(int(job.rows.index[row]))
            if job.resize:
                data, ext = resize_image(data, ext, job.resize)
            writer.write(sample_of(key, record, data, ext))
    digest = bytes.fromhex(sha256(path))
    return {"bytes": np.int64(path.stat().st_size), "sha256": np.frombuffer(digest, np.uint8)}

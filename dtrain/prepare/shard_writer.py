"""WebDataset tar shards: one split's samples in a fixed order, cut by sample count or file size.

Every byte is a function of the rows and the images (mtime 0, sorted JSON keys), so that a rerun
writes identical files and `dataset.json` can hold checksums worth comparing.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

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


def tar_bytes(sample: dict) -> int:
    """Bytes a sample adds to a tar file: a header block per member plus its padded payload."""
    return sum(
        TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if k != "__key__"
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shards(
    folder: Path,
    source: Source,
    rows: Iterable[dict],
    split: str,
    shard_size: int,
    shard_bytes: int | None = None,
    resize: int | None = None,
) -> dict[str, dict]:
    """Write one split's rows in order, starting a new shard when the next sample would pass
    `shard_size` samples or `shard_bytes` file bytes (tar's final record padding aside).
    Returns shard name -> {split, count} and records each row's shard in `row["shard"]`."""
    import webdataset as wds

    shards: dict[str, dict] = {}
    writer, size, count = None, 0, 0
    max_bytes = shard_bytes or float("inf")
    try:
        for row in rows:
            data, ext = source.read(row["index"])
            if resize:
                data, ext = resize_image(data, ext, resize)
            record = {
                "clean_label": row["clean_label"],
                "noisy_label": row["noisy_label"],
                "source": row["source"],
                "group": row["group"],
            }
            sample = {
                "__key__": row["key"],
                ext: data,
                "cls": str(row["noisy_label"]).encode(),
                "json": json.dumps(record, sort_keys=True).encode(),
            }
            nbytes = tar_bytes(sample)
            if writer is None or count >= shard_size or size + nbytes > max_bytes:
                if writer is not None:
                    writer.close()
                name = f"{split}-{len(shards):06d}.tar"
                # integer mtime: a float one makes tarfile add a PAX header to every member
                writer = wds.TarWriter(str(folder / name), mtime=0)
                shards[name] = {"split": split, "count": 0}
                size, count = 2 * TAR_BLOCK, 0  # the end-of-archive blocks
            writer.write(sample)
            size += nbytes
            count += 1
            shards[name]["count"] = count
            row["shard"] = name
    finally:
        if writer is not None:
            writer.close()
    return shards

"""prepare's first pass over the images: decode each one (cheaply, in JPEG draft mode) for its
near-duplicate hashes, its colour, its size and, where a step needs them, its 16x16 pixels
(instance-dependent noise) and the bytes it will take in a shard (`--shard-bytes`). Chunks of
images run on the chosen engine; what comes back is about 600 bytes per image, most of it the
hashes of its 16 windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtrain.errors import DataError
from dtrain.prepare.dedup import HASH_BYTES, THUMB_SIDE, WINDOWS, BadImageError, fingerprint
from dtrain.prepare.engines import Engine, run_tasks
from dtrain.prepare.shard_writer import resize_image
from dtrain.prepare.sources import Source

CHUNK = 500  # images per task: large enough to hide a task's overhead, small for the bar


@dataclass(frozen=True)
class ScanSpec:
    start: int
    stop: int
    thumbs: bool  # keep the 16x16 pixels
    payload_resize: int | None  # measure the stored bytes after this resize (0: as they are)


@dataclass
class Scan:
    """Per readable image (`kept`: its index in the source), in source order."""

    kept: np.ndarray
    hashes: np.ndarray
    mirrors: np.ndarray
    windows: np.ndarray  # [N, WINDOWS, HASH_BYTES]: the hashes of each image's windows
    constant: np.ndarray
    values: np.ndarray
    thumbs: np.ndarray | None
    payload: np.ndarray | None
    stats: dict


def scan_chunk(source: Source, spec: ScanSpec) -> dict:
    """One task: the fingerprints of images `start..stop`; unreadable ones have ok=False."""
    n = spec.stop - spec.start
    out = {
        "ok": np.zeros(n, bool),
        "hash": np.zeros((n, HASH_BYTES), np.uint8),
        "mirror": np.zeros((n, HASH_BYTES), np.uint8),
        "windows": np.zeros((n, WINDOWS, HASH_BYTES), np.uint8),
        "constant": np.zeros(n, bool),
        "value": np.zeros(n, np.int16),
        "gray": np.zeros(n, bool),
        "size": np.zeros((n, 2), np.int64),
        "thumb": np.zeros((n, THUMB_SIDE, THUMB_SIDE) if spec.thumbs else (n, 0), np.uint8),
        "payload": np.zeros(n, np.int64),
    }
    for row, index in enumerate(range(spec.start, spec.stop)):
        data, ext = source.read(index)
        try:
            facts = fingerprint(data)
        except BadImageError:
            continue
        out["ok"][row] = True
        for key in ("hash", "mirror", "windows", "constant", "value", "gray", "size"):
            out[key][row] = facts[key]
        if spec.thumbs:
            out["thumb"][row] = facts["thumb"]
        if spec.payload_resize is not None:
            if spec.payload_resize:
                data = resize_image(data, ext, spec.payload_resize)[0]
            out["payload"][row] = len(data)
    return out


def _bad_image(source: Source, index: int) -> str:
    try:
        fingerprint(source.read(index)[0])
    except BadImageError as err:
        return str(err)
    return "unreadable in a worker"


def scan_images(
    source: Source,
    *,
    thumbs: bool,
    payload_resize: int | None,
    skip_bad_images: bool,
    engine: Engine,
    workers: int,
    address: str,
    progress: bool,
) -> Scan:
    """Every image's fingerprint. An unreadable image stops the scan, naming the file, unless
    `skip_bad_images`, which leaves it out and lists it in the statistics."""
    from tqdm.auto import tqdm

    specs = [
        ScanSpec(start, min(start + CHUNK, len(source)), thumbs, payload_resize)
        for start in range(0, len(source), CHUNK)
    ]
    chunks = []
    with tqdm(
        total=len(source), desc="reading", unit="img", disable=not progress, leave=False
    ) as bar:
        for spec, chunk in zip(
            specs, run_tasks(scan_chunk, source, specs, engine, workers, address), strict=True
        ):
            bad = spec.start + np.flatnonzero(~chunk["ok"])
            if len(bad) and not skip_bad_images:
                raise DataError(
                    f"cannot decode image {source.paths[bad[0]]} ({_bad_image(source, bad[0])}); "
                    "fix or remove the file, or pass --skip-bad-images to leave it out"
                )
            chunk["index"] = np.arange(spec.start, spec.stop)
            chunks.append({k: v[chunk["ok"]] for k, v in chunk.items()})
            bar.update(spec.stop - spec.start)
    joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    if not chunks or not len(joined["index"]):
        raise DataError(f"source {source.name} has no readable images")
    kept = joined["index"]
    unread = np.ones(len(source), bool)
    unread[kept] = False
    sizes = joined["size"]
    gray = int(joined["gray"].sum())
    stats = {
        "channels": 1 if gray >= 0.95 * len(kept) else 3,
        "grayscale_fraction": round(gray / len(kept), 4),
        "min_size": sizes.min(axis=0).tolist(),
        "max_size": sizes.max(axis=0).tolist(),
        "skipped_unreadable": [source.paths[i] for i in np.flatnonzero(unread)],
    }
    return Scan(
        kept=kept,
        hashes=joined["hash"],
        mirrors=joined["mirror"],
        windows=joined["windows"],
        constant=joined["constant"],
        values=joined["value"],
        thumbs=joined["thumb"] if thumbs else None,
        payload=joined["payload"] if payload_resize is not None else None,
        stats=stats,
    )

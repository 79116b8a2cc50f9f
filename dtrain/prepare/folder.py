"""The output folder's life. A rerun of the same request finds its dataset intact and does
nothing; a different dtrain dataset is replaced only with `--overwrite`; a folder that is not a
dtrain dataset is never touched. A new dataset is built in a hidden sibling folder and swapped in
at the end, so a crash never leaves a half-written one where a dataset is expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dtrain.errors import DataError
from dtrain.prepare.records import DATASET_JSON
from dtrain.prepare.shard_writer import sha256


def holds_request(out: Path, request: dict, overwrite: bool) -> bool:
    """True when `out` already holds this exact dataset intact; raises when it may not be
    replaced."""
    if not out.exists():
        return False
    if out.is_file():
        raise DataError(f"output {out} is a file; choose a folder with --out")
    meta_path = out / DATASET_JSON
    if not meta_path.is_file():
        if any(out.iterdir()):
            raise DataError(
                f"output folder {out} is not empty and holds no {DATASET_JSON}: it is not a dtrain "
                "dataset, so it is left alone; choose another --out"
            )
        return False
    try:
        old = json.loads(meta_path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:  # a damaged dtrain dataset: replaceable like a different one
        if overwrite:
            return False
        raise DataError(
            f"{meta_path} cannot be read ({err}); pass --overwrite to replace the dataset in "
            f"{out} or choose another --out"
        ) from err
    if old.get("request") == request:
        return all(
            (out / name).is_file() and sha256(out / name) == info["sha256"]
            for name, info in old["shards"].items()
        )
    if not overwrite:
        before = old.get("request", {})
        changed = sorted(
            k
            for k in set(request) | set(before)
            if request.get(k) != before.get(k) or (k in request) != (k in before)
        )
        raise DataError(
            f"{out} holds a different dataset (differs in: {', '.join(changed)}); pass "
            "--overwrite to replace it or choose another --out"
        )
    return False


def new_staging(out: Path) -> Path:
    """An empty hidden sibling of `out` to build the dataset in (a crashed run's is discarded)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, out: Path) -> None:
    """Move the finished dataset to `out`, replacing what is there."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)

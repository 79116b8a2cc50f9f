"""The one way dtrain writes a file that must never be seen half-written: a temp file beside the
target, fsync, rename over the target, fsync of the folder (so that the rename itself survives a
power cut). Checkpoints, configs, summaries and JSON results all go through it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Write `content` (bytes, text, or a function that writes to a binary handle) to `path`
    atomically. On any error the target keeps its old content and no temp file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, value: Any) -> Path:
    return write_atomic(path, json.dumps(value, indent=2) + "\n")


def link_atomic(source: str | Path, target: str | Path) -> Path:
    """`target` becomes a hard link to `source` (a copy where links are not possible), replacing
    any old `target` in one rename: timm's CheckpointSaver way of keeping `best` beside `last`
    without serialising the weights twice."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links
            import shutil

            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def promote(source: str | Path, target: str | Path) -> Path:
    """Rename a finished file over `target` and make the rename durable."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)
    return Path(target)

"""Reading one shard as it streams: its samples in order, its end and sample count checked, and
its sha256 computed on the way (no second read) and compared with `dataset.json`'s at the end.

Members stay bytes: nothing is extracted to disk or unpickled (`decode_sample` picks the few it
knows). A member whose name is absolute or climbs out with `..` was not written by `dtrain
prepare`: its sample carries a `problem` and is skipped like a corrupt one. A shard that ends
early (cut mid-member, empty, fewer samples than listed) raises under `strict`; otherwise every
sample it still owed comes out as a `RawSample` with a `problem`, a counted skip, so that the
epoch plan still holds on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from dtrain.errors import DataError

RECREATE = "re-create it with dtrain prepare (or, for your own shards, run dtrain index again)"


@dataclass
class RawSample:
    """One sample's members as read (extension -> bytes), or why it cannot be used."""

    url: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


class _HashingReader:
    """A read-only stream that hashes everything read through it."""

    def __init__(self, raw) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read the rest (tar's end blocks and record padding), so that the digest is the file's."""
        while self.read(1 << 20):
            pass


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile takes a cut or damaged header after the first member, or a file that stops
    between members, for the end of the archive; only the zero block that ends a tar is one."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as err:
            raise tarfile.ReadError(f"{err} at byte {tar.offset}") from None


class _BrokenShard(Exception):
    """The tar stream stopped being readable; the message says where."""


def _unsafe(name: str) -> bool:
    """Absolute or climbing out with `..` (tar names are POSIX paths). Plain string tests: a
    `PurePosixPath` per member would cost more than reading it, and intern every name."""
    return name.startswith("/") or ".." in name.split("/")


def _tar_samples(url: str, reader: _HashingReader) -> Iterator[RawSample]:
    """Members grouped into samples by key (webdataset's rule: the name up to the first dot of
    its last part); the sample being read when the stream breaks is lost, not yielded."""
    sample, where = None, "before its first member"
    try:
        with tarfile.open(fileobj=reader, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # a stream: keep no member list
                if not info.isreg():
                    continue
                where = f"in member {info.name!r}"
                data = tar.extractfile(info).read()
                where = f"after member {info.name!r}"
                key, ext = base_plus_ext(info.name)
                if _unsafe(info.name):
                    key, ext = key or info.name, None
                elif key is None:
                    continue  # no extension: not a sample member (webdataset skips it too)
                if sample is not None and key != sample.key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = RawSample(url, key)
                if ext is None:
                    sample.problem = sample.problem or (
                        f"{url} member {info.name!r}: unsafe name (absolute or with '..'); "
                        "this shard was not written by dtrain prepare"
                    )
                elif ext.lower() in sample.members:
                    sample.problem = sample.problem or f"{url} member {info.name}: a duplicate"
                else:
                    sample.members[ext.lower()] = data
        reader.drain()
        reader.raw.close()  # a `pipe:` command reports its exit status here
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        problem = "is empty (0 bytes)" if reader.size == 0 else f"breaks off {where} ({err})"
        raise _BrokenShard(problem) from err
    if sample is not None:
        yield sample


def _open(url: str) -> tuple[object, _HashingReader]:
    """The raw stream of shard `url` (any URL webdataset opens) and a hashing reader over it."""
    try:
        raw = wds.gopen(url)
    except Exception as err:  # gopen raises OSError, ValueError or a pipe error by scheme
        raise DataError(f"cannot open shard {url}: {err}") from err
    return raw, _HashingReader(raw)


def read_shard(
    url: str, count: int | None, sha256: str | None, strict: bool
) -> Iterator[RawSample]:
    """The samples of shard `url`, which must hold `count` samples (when known) and, once read to
    its end, have the digest `sha256` (when known); see the module docstring."""
    raw, reader = _open(url)
    read, problem = 0, None
    try:
        for sample in _tar_samples(url, reader):
            read += 1
            if count is not None and read > count:  # fail before the ranks drift apart
                raise DataError(
                    f"shard {url} holds more than the {count} samples its dataset.json says; "
                    f"{RECREATE}"
                )
            yield sample
    except _BrokenShard as err:
        problem = str(err)
    finally:
        with contextlib.suppress(Exception):  # a reader stopped early may leave a pipe unhappy
            raw.close()
    if problem is None and count is not None and read < count:
        problem = f"holds {read} samples but its dataset.json says {count}"
    if problem is not None:
        if strict:
            raise DataError(f"shard {url} {problem}; {RECREATE}")
        missing = 1 if count is None else count - read  # resampled: the rest of the shard
        reason = f"shard {url} {problem}" + (
            f"; {missing} of its {count} samples are missing" if count is not None else ""
        )
        yield from (RawSample(url, "", problem=reason) for _ in range(missing))
        return
    actual = reader.digest.hexdigest()
    if sha256 is not None and actual != sha256:
        raise DataError(
            f"shard {url} has sha256 {actual} but its dataset.json says {sha256}: it changed "
            f"since it was written; {RECREATE}"
        )


class ShardScan:
    """Every sample of a shard someone else wrote, read to its end (`dtrain index`); once
    iterated, `sha256` is the digest `read_shard` will compute on the same bytes."""

    def __init__(self, url: str) -> None:
        self.url, self.sha256 = url, None

    def __iter__(self) -> Iterator[RawSample]:
        raw, reader = _open(self.url)
        try:
            yield from _tar_samples(self.url, reader)
        except _BrokenShard as err:
            raise DataError(f"shard {self.url} {err}") from err
        finally:
            with contextlib.suppress(Exception):
                raw.close()
        self.sha256 = reader.digest.hexdigest()

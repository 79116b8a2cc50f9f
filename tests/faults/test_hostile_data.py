"""Hostile and broken data, as the loader and `dtrain prepare` meet it: truncated and empty shards,
shards changed since they were written, truncated JPEGs, decompression bombs, bad labels, pickled
payloads and member names that climb out of the shard. Each case is a clear error naming the
shard and member (`strict`), or a counted skip that every batch reports in `skipped` while every
rank keeps the plan's batch count. Real files, real tars, real PIL."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_dataset, make_image, refresh_checksum, rewrite_shard, write_stripes
from PIL import Image, ImageFile

from dtrain.dataset.loader import CorruptSampleError, make_loader, split_urls
from dtrain.errors import DataError
from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.shard_writer import sha256

SHARD = 6  # samples per shard; 24 samples in 4 train shards


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """24 stripes PNGs in two class folders."""
    return write_stripes(tmp_path_factory.mktemp("faults") / "img", per_class=12)


@pytest.fixture(scope="module")
def dataset(source) -> Path:
    return prepare(
        PrepareConfig(
            source=str(source),
            out=str(source.parent / "ds"),
            split=(1.0, 0, 0),
            shard_size=SHARD,
            progress=False,
        )
    )


@pytest.fixture
def ds(dataset, tmp_path) -> Path:
    """A private copy of the dataset, for a test to damage."""
    return copy_dataset(dataset, tmp_path / "ds")


def first_shard(ds: Path) -> Path:
    return ds / "train-000000.tar"


def loader(ds: Path, strict: bool, **kw):
    kw = {"train": False, "batch_size": 4, "image_size": 16, **kw}
    return make_loader(split_urls(ds, "train"), strict=strict, **kw)


def epoch(ds: Path, **kw) -> tuple[list[str], list[str]]:
    """One non-strict pass: the keys of the valid samples and the skipped samples' reasons, after
    checking that every batch is full, its `skipped` has one line per corrupt sample, and the
    loader yielded as many batches as it planned."""
    data = loader(ds, strict=False, **kw)
    batches = list(data)
    assert len(batches) == len(data)
    keys, skipped = [], []
    for b in batches:
        assert len(b["key"]) == 4
        assert len(b["skipped"]) == int(b["corrupt"].sum())
        assert not (b["valid"] & b["corrupt"]).any()
        keys += [k for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
        skipped += b["skipped"]
    return keys, skipped


def refused_then_skipped(ds: Path, victim: str, reason: str, whole: bool = False) -> list[str]:
    """Strict: a CorruptSampleError whose message starts with `reason` (is it, if `whole`);
    non-strict: exactly `victim` skipped, for that reason. Returns the keys kept."""
    pattern = "^" + re.escape(reason) + ("$" if whole else "")
    with pytest.raises(CorruptSampleError, match=pattern):
        list(loader(ds, strict=True))
    keys, skipped = epoch(ds)
    assert len(skipped) == 1 and skipped[0].startswith(reason), skipped
    assert victim not in keys and len(keys) == 23
    return keys


def shard_keys(ds: Path) -> list[str]:
    """Every sample key of the dataset, from its manifest."""
    import pyarrow.parquet as pq

    return pq.read_table(ds / "manifest.parquet").column("key").to_pylist()


def member_offsets(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def keys_in_order(shard: Path) -> list[str]:
    return list(dict.fromkeys(m.name.split(".")[0] for m in member_offsets(shard)))


class Payload:
    """Unpickling this makes the directory `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --- 1. truncated and empty shards ------------------------------------------------------------


def _cut_in_member(shard: Path) -> tuple[int, str]:
    """Cut inside the third sample's image: two samples survive."""
    member = next(m for m in member_offsets(shard) if m.name == f"{keys_in_order(shard)[2]}.png")
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    return 2, f"breaks off in member '{member.name}' (unexpected end of data)"


def _cut_between_members(shard: Path) -> tuple[int, str]:
    """Cut right before the fourth sample's first header, where tarfile alone would see the end
    of the archive. The third sample is lost too: nothing says that it was complete."""
    members = member_offsets(shard)
    fourth = keys_in_order(shard)[3]
    first = next(i for i, m in enumerate(members) if m.name.split(".")[0] == fourth)
    end = members[first].offset
    shard.write_bytes(shard.read_bytes()[:end])
    return 2, f"breaks off after member '{members[first - 1].name}' (empty header at byte {end})"


def _empty(shard: Path) -> tuple[int, str]:
    shard.write_bytes(b"")
    return 0, "is empty (0 bytes)"


def _no_members(shard: Path) -> tuple[int, str]:
    tarfile.open(shard, "w").close()
    return 0, f"holds 0 samples but its dataset.json says {SHARD}"


DAMAGES = {
    "cut in a member": _cut_in_member,
    "cut between members": _cut_between_members,
    "0 bytes": _empty,
    "a tar with no members": _no_members,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_truncated_or_empty_shard_fails_naming_it_when_strict(ds, damage):
    _, what = DAMAGES[damage](first_shard(ds))
    with pytest.raises(DataError) as err:
        list(loader(ds, strict=True))
    message = str(err.value)
    assert f"shard {first_shard(ds)} {what}" in message
    assert "re-create it with dtrain prepare" in message and "sha256" not in message


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_truncated_or_empty_shard_becomes_counted_skips_on_every_rank(ds, damage):
    survivors, what = DAMAGES[damage](first_shard(ds))
    lost = SHARD - survivors
    keys, skipped = epoch(ds)
    assert len(keys) == 24 - lost and len(set(keys)) == len(keys)
    reason = f"shard {first_shard(ds)} {what}; {lost} of its {SHARD} samples are missing"
    assert skipped == [reason] * lost  # the truncation, not also the checksum
    # two ranks, training order: the same batch count on both, every surviving sample once
    seen, lengths, reasons = [], [], []
    for rank in range(2):
        data = loader(ds, strict=False, train=True, rank=rank, world_size=2, seed=1)
        batches = list(data)
        lengths += [len(batches), len(data)]
        seen += [k for b in batches for k, v in zip(b["key"], b["valid"], strict=True) if v]
        reasons += [r for b in batches for r in b["skipped"]]
    assert len(set(lengths)) == 1
    assert sorted(seen) == sorted(keys) and reasons == skipped


def test_a_shard_holding_more_samples_than_listed_fails_even_when_not_strict(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    meta["shards"]["train-000000.tar"]["count"] = SHARD - 1
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"train-000000.tar holds more than the {SHARD - 1} "):
        list(loader(ds, strict=False))


# --- 2. checksums -----------------------------------------------------------------------------


def _change_a_label_in_place(shard: Path) -> None:
    """Flip one `.cls` byte: the tar stays valid and holds as many samples; its bytes differ."""
    member = next(m for m in member_offsets(shard) if m.name.endswith(".cls"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data] = ord("1") if data[member.offset_data] == ord("0") else ord("0")
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("strict", [True, False])
def test_a_shard_changed_since_prepare_fails_its_checksum(ds, strict):
    shard = first_shard(ds)
    listed = json.loads((ds / "dataset.json").read_text())["shards"][shard.name]["sha256"]
    _change_a_label_in_place(shard)
    assert sha256(shard) != listed
    with pytest.raises(DataError) as err:
        list(loader(ds, strict=strict))
    assert str(err.value) == (
        f"shard {shard} has sha256 {sha256(shard)} but its dataset.json says {listed}: it changed "
        "since it was written; re-create it with dtrain prepare (or, for your own shards, run "
        "dtrain index again)"
    )


def test_resampled_mode_checks_the_shards_it_reads_to_the_end_only(ds):
    for shard in ds.glob("train-*.tar"):
        _change_a_label_in_place(shard)
    kw = {"resampled": True, "batch_size": 4}
    # 4 samples: one shard read part-way, and a part cannot be checked
    assert len(list(loader(ds, strict=True, samples_per_epoch=4, **kw))) == 1
    with pytest.raises(DataError, match="it changed since it was written"):
        list(loader(ds, strict=True, samples_per_epoch=8, **kw))


# --- 3. a truncated JPEG ----------------------------------------------------------------------


def truncated_jpeg() -> bytes:
    """A JPEG cut in its scan data: the header opens, the pixels do not all arrive."""
    buffer = io.BytesIO()
    Image.fromarray(make_image(1, side=64)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    return data


def _replace_image(shard: Path, index: int, ext: str, data: bytes) -> str:
    """The key of the `index`-th sample of `shard`, whose image is now `data` under `.ext`."""
    keys = keys_in_order(shard)

    def change(sample):
        if sample["__key__"] == keys[index]:
            sample.pop("png")
            sample[ext] = data
        return sample

    rewrite_shard(shard, change)
    return keys[index]


def test_a_truncated_jpeg_is_refused_even_after_the_whole_training_stack_is_imported(ds):
    import dtrain.train.trainer  # noqa: F401  (timm, torchvision: none may turn truncation off)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    key = _replace_image(first_shard(ds), 1, "jpg", truncated_jpeg())
    member = f"{first_shard(ds)} member {key}.jpg"
    refused_then_skipped(ds, key, f"{member}: cannot decode (image file is")


# --- 4. decompression bombs -------------------------------------------------------------------


def png_bomb(side: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares side x side pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    body = zlib.compress(b"\0" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


LIMIT = f"more pixels than PIL's Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}"
# PIL warns above its limit and raises above twice it: both are refused
BOMB_SIDES = [10_000, 20_000]


@pytest.mark.parametrize("side", BOMB_SIDES)
def test_a_png_bomb_in_a_shard_is_refused_naming_the_limit(ds, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    key = _replace_image(first_shard(ds), 0, "png", png_bomb(side))
    member = f"{first_shard(ds)} member {key}.png"
    filters = list(warnings.filters)
    refused_then_skipped(ds, key, f"{member}: cannot decode ({LIMIT}")
    assert warnings.filters == filters  # the process's warning filters are left as they were


@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_a_png_bomb_stops_prepare_naming_the_file_or_is_skipped_and_recorded(
    source, tmp_path, kind
):
    img = Path(shutil.copytree(source, tmp_path / "img"))
    (img / "vertical" / "bomb.png").write_bytes(png_bomb(20_000))
    spec = img
    if kind == "manifest":
        spec = img / "labels.csv"
        files = sorted(img.rglob("*.png"))
        spec.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    config = {"source": str(spec), "split": (1.0, 0, 0), "progress": False}
    with pytest.raises(DataError, match=rf"cannot decode image .*vertical/bomb.png \({LIMIT}"):
        prepare(PrepareConfig(out=str(tmp_path / "ds"), **config))
    out = prepare(PrepareConfig(out=str(tmp_path / "ds"), skip_bad_images=True, **config))
    meta = json.loads((out / "dataset.json").read_text())
    assert [Path(p).name for p in meta["images"]["skipped_unreadable"]] == ["bomb.png"]
    assert meta["splits"]["train"]["count"] == 24


# --- 5. labels that are not labels ------------------------------------------------------------


@pytest.mark.parametrize(
    "label, problem", [(b"benign", "not an integer label"), (b"7", "label 7 is outside [0, 2)")]
)
def test_a_bad_cls_member_is_refused_or_skipped(ds, label, problem):
    shard = first_shard(ds)
    victim = keys_in_order(shard)[4]
    rewrite_shard(shard, lambda s: {**s, "cls": label} if s["__key__"] == victim else s)
    refused_then_skipped(ds, victim, f"{shard} member {victim}.cls: {problem}", whole=True)


# --- 6. pickled payloads ----------------------------------------------------------------------


def payloads(marker: Path, folder: Path) -> dict[str, bytes]:
    """The same live payload as a pickle and as a real `torch.save` file."""
    pickled = pickle.dumps(Payload(marker))
    torch.save(Payload(marker), folder / "payload.pth")
    return {"pickle": pickled, "pyd": pickled, "pth": (folder / "payload.pth").read_bytes()}


def assert_live(marker: Path, load) -> None:
    """The payload is live: loading it (what dtrain must never do) runs its code."""
    assert not marker.exists()
    load()
    assert marker.is_dir()
    marker.rmdir()


def test_pickle_and_torch_members_in_shards_are_never_unpickled(ds, tmp_path):
    marker = tmp_path / "unpickled"
    members = payloads(marker, tmp_path)
    for shard in ds.glob("train-*.tar"):
        rewrite_shard(shard, lambda s: {**s, **members})
    data = loader(ds, strict=True, train=True, num_workers=1)
    assert sum(int(b["valid"].sum()) for b in data) == 24
    assert not marker.exists()
    assert_live(marker, lambda: pickle.loads(members["pickle"]))
    assert_live(marker, lambda: torch.load(io.BytesIO(members["pth"]), weights_only=False))


def test_prepare_never_loads_pickle_files_from_a_source(source, tmp_path):
    marker = tmp_path / "unpickled"
    members = payloads(marker, tmp_path)
    img = Path(shutil.copytree(source, tmp_path / "img"))
    (img / "vertical" / "x.pickle").write_bytes(members["pickle"])
    (img / "vertical" / "x.pth").write_bytes(members["pth"])
    np.save(img / "vertical" / "x.npy", np.array([Payload(marker)], dtype=object))
    # a folder source takes images only
    out = prepare(PrepareConfig(source=str(img), out=str(tmp_path / "ds"), progress=False))
    meta = json.loads((out / "dataset.json").read_text())
    assert sum(s["count"] for s in meta["splits"].values()) == 24
    # a manifest naming a pickle as an image gets it decoded as an image, which fails
    (img / "m.csv").write_text("path,label\nvertical/x.pth,0\nvertical/x.pickle,1\n")
    with pytest.raises(DataError, match=r"cannot decode image vertical/x.pth"):
        prepare(PrepareConfig(source=str(img / "m.csv"), out=str(tmp_path / "m"), progress=False))
    # an .npz of object arrays is refused, not unpickled
    np.savez(
        tmp_path / "x.npz",
        train_images=np.array([Payload(marker)], dtype=object),
        train_labels=np.zeros(1, dtype=np.int64),
    )
    with pytest.raises(DataError, match=r"x.npz:train_images without pickle"):
        prepare(PrepareConfig(source=str(tmp_path / "x.npz"), out=str(tmp_path / "n")))
    assert_live(marker, lambda: pickle.loads(members["pickle"]))
    assert_live(marker, lambda: torch.load(img / "vertical" / "x.pth", weights_only=False))
    assert_live(marker, lambda: np.load(img / "vertical" / "x.npy", allow_pickle=True))
    assert_live(marker, lambda: np.load(tmp_path / "x.npz", allow_pickle=True)["train_images"])


# --- 7. member names that climb out -----------------------------------------------------------


@pytest.mark.parametrize("prefix", ["../", "/etc/"])
def test_member_names_with_dotdot_or_an_absolute_path_are_refused_or_skipped(ds, prefix):
    shard = first_shard(ds)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[-1][0].name.split(".")[0]  # the last sample, under a hostile name
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name.split(".")[0] == victim:
                info.name = prefix + info.name
            tar.addfile(info, io.BytesIO(data))
    refresh_checksum(shard)
    first = f"{prefix}{victim}.cls"
    keys = refused_then_skipped(ds, victim, f"{shard} member '{first}': unsafe name")
    assert not any(prefix in k for k in keys)
    assert set(keys) < set(shard_keys(ds))

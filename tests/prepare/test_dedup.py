"""Near-duplicate grouping finds copies of one scan and not two patients: planted copies among
synthetic chest films (benchmarks/synthetic_patients.py, every film its own patient) land in
their original's group and split, and the split meets the asked fractions where the old 16x16
thumbnail correlation chained patients into one group and left val empty. The hash and the
search are checked on their own: a mirror image's hash, and the distance boundary."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.dedup import DEFAULT_DISTANCE, fingerprint, near_duplicate_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import synthetic_patients as sp  # noqa: E402


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("films")
    sp.generate(out, 600, seed=5)
    return out


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def bits_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(a ^ b).sum())


def test_a_mirror_image_hashes_to_the_mirror_hash(films):
    image = Image.open(films / sp.image_path(0))
    flipped = fingerprint(jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    facts = fingerprint(jpeg(image))
    assert bits_apart(flipped["hash"], facts["mirror"]) <= 4  # JPEG rounding aside
    assert bits_apart(flipped["hash"], facts["hash"]) > 3 * DEFAULT_DISTANCE


def test_the_distance_is_inclusive_and_either_way_round():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 256).astype(np.uint8)

    def flip_bits(k: int, offset: int) -> np.ndarray:
        changed = base.copy()
        changed[offset : offset + k] ^= 1
        return np.packbits(changed)

    hashes = np.stack([np.packbits(base), flip_bits(6, 0), flip_bits(7, 100), flip_bits(200, 0)])
    mirrors = np.packbits(rng.integers(0, 2, (4, 256)).astype(np.uint8), axis=1)  # far away
    mirrors[3] = hashes[0]  # image 3 is image 0 flipped
    constant = np.zeros(4, bool)
    groups = near_duplicate_groups(hashes, mirrors, constant, np.zeros(4, np.int16), 6)
    assert groups.tolist() == [0, 0, 1, 0]  # 6 bits joined, 7 not; 3 through its mirror
    no_mirror = near_duplicate_groups(hashes, hashes, constant, np.zeros(4, np.int16), 6)
    assert no_mirror.tolist() == [0, 0, 1, 2]


def test_constant_images_join_only_their_exact_copies():
    hashes = np.zeros((4, 32), np.uint8)  # all alike: a constant image's hash says nothing
    groups = near_duplicate_groups(
        hashes, hashes, np.ones(4, bool), np.asarray([0, 255, 0, 7], np.int16), 28
    )
    assert groups.tolist() == [0, 1, 0, 2]


def test_planted_copies_join_their_original_and_patients_stay_apart(films, tmp_path):
    out = prepare(
        PrepareConfig(
            source=str(films / "manifest.csv"),
            classes=["normal", "nodule"],
            out=str(tmp_path / "ds"),
            progress=False,
            workers=1,
        )
    )
    with open(films / "manifest.csv", newline="") as handle:
        planted = list(csv.DictReader(handle))
    manifest = {r["source"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    copies = [r for r in planted if r["copy_kind"] and r["copy_kind"] != "cropped"]
    assert len(copies) >= 40
    for row in copies:
        copy, original = manifest[row["path"]], manifest[row["copy_of"]]
        assert copy["group"] == original["group"], row
        assert copy["split"] == original["split"], row
    originals = [manifest[r["path"]] for r in planted if not r["copy_kind"]]
    groups = np.bincount([r["group"] for r in originals])
    assert (groups > 1).sum() <= 0.01 * len(originals)  # two patients joined: at most 1 %
    counts = np.bincount([["train", "val", "test"].index(r["split"]) for r in manifest.values()])
    assert np.abs(counts / counts.sum() - [0.7, 0.1, 0.2]).max() <= 0.02

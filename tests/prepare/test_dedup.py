"""Near-duplicate grouping finds copies of one scan and not two patients: planted copies among
synthetic chest films (benchmarks/synthetic_patients.py, every film its own patient) land in
their original's group and split, and the split meets the asked fractions where the old 16x16
thumbnail correlation chained patients into one group and left val empty. The hash and the
search are checked on their own: a mirror image's hash, a window's hash against the crop it
stands for, and the distance boundary."""

from __future__ import annotations

import csv
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.dedup import (
    DEFAULT_DISTANCE,
    EXACT_UP_TO,
    WINDOW_INSETS,
    HashSearch,
    QueryBlock,
    default_distance,
    fingerprint,
    list_centres,
    near_duplicate_groups,
    resolved_search,
    search_block,
)

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


def test_a_window_hashes_like_the_crop_it_stands_for(films):
    image = Image.open(films / sp.image_path(0)).convert("L")
    side = image.size[0]
    facts = fingerprint(jpeg(image))
    # window_hashes' order: top, bottom, left, right, the last varying fastest
    for index, (top, bottom, left, right) in enumerate(itertools.product(WINDOW_INSETS, repeat=4)):
        box = (left * side, top * side, side - right * side, side - bottom * side)
        crop = fingerprint(jpeg(image.resize((side, side), Image.Resampling.BILINEAR, box=box)))
        assert bits_apart(crop["hash"], facts["windows"][index]) <= 16, (top, bottom, left, right)
        assert bits_apart(crop["hash"], facts["hash"]) > 2 * DEFAULT_DISTANCE


def test_a_window_joins_its_image_to_another_only_when_given():
    rng = np.random.default_rng(1)
    hashes = np.packbits(rng.integers(0, 2, (3, 256)).astype(np.uint8), axis=1)
    windows = np.packbits(rng.integers(0, 2, (3, 16, 256)).astype(np.uint8), axis=2)
    windows[2, 5] = hashes[0]  # image 0 is a crop of image 2: one of 2's windows
    constant, values = np.zeros(3, bool), np.zeros(3, np.int16)
    with_windows = near_duplicate_groups(hashes, hashes, constant, values, 6, windows=windows)
    assert with_windows.tolist() == [0, 1, 0]
    assert near_duplicate_groups(hashes, hashes, constant, values, 6).tolist() == [0, 1, 2]


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
    copies = [r for r in planted if r["copy_kind"]]
    assert len(copies) >= 40 and sum(r["copy_kind"] == "cropped" for r in copies) >= 5
    for row in copies:
        copy, original = manifest[row["path"]], manifest[row["copy_of"]]
        assert copy["group"] == original["group"], row
        assert copy["split"] == original["split"], row
    originals = [manifest[r["path"]] for r in planted if not r["copy_kind"]]
    groups = np.bincount([r["group"] for r in originals])
    assert (groups > 1).sum() <= 0.01 * len(originals)  # two patients joined: at most 1 %
    counts = np.bincount([["train", "val", "test"].index(r["split"]) for r in manifest.values()])
    assert np.abs(counts / counts.sum() - [0.7, 0.1, 0.2]).max() <= 0.02


def pairs_found(search: HashSearch) -> set[tuple[int, int]]:
    n = len(search.codes)
    found = [search_block(search, QueryBlock(0, n, mirrored)) for mirrored in (False, True)]
    return {tuple(sorted(p)) for f in found for p in f["pairs"].tolist()}


def test_the_inverted_file_finds_what_the_exact_search_finds(films):
    with open(films / "manifest.csv", newline="") as handle:
        facts = [fingerprint((films / r["path"]).read_bytes()) for r in csv.DictReader(handle)]
    codes = np.stack([f["hash"] for f in facts])
    mirrors = np.stack([f["mirror"] for f in facts])
    exact = pairs_found(HashSearch(codes, mirrors, DEFAULT_DISTANCE))
    assert len(exact) >= 40  # the planted copies
    centres = list_centres(codes, "inverted", list_size=8)
    assert centres is not None and len(centres) == len(codes) // 8
    assert pairs_found(HashSearch(codes, mirrors, DEFAULT_DISTANCE, centres, probes=8)) == exact
    # one list per query: the lists really bound the search (and this is where pairs go missing)
    assert pairs_found(HashSearch(codes, mirrors, DEFAULT_DISTANCE, centres, probes=1)) < exact


def test_auto_searches_exactly_up_to_its_threshold():
    assert resolved_search("auto", EXACT_UP_TO) == "exact"
    assert resolved_search("auto", EXACT_UP_TO + 1) == "inverted"
    assert resolved_search("exact", 10**7) == "exact"
    codes = np.zeros((EXACT_UP_TO + 1, 32), np.uint8)
    assert list_centres(codes[:EXACT_UP_TO], "auto") is None
    assert list_centres(codes, "exact") is None
    assert len(list_centres(codes, "auto")) == (EXACT_UP_TO + 1) // 256


def test_the_default_distance_shrinks_as_the_data_grows():
    # other patients within a fixed distance grow with N (benchmarks/dedup_quality.py)
    assert [default_distance(n) for n in (3000, 30_000, 100_000, 10**6, 10**7)] == [
        26,
        26,
        24,
        20,
        16,
    ]

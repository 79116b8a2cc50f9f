"""benchmarks/synthetic_patients.py: every film its own patient (a shared layout, yet distinct),
planted copies of every kind under new patient ids with their original's label, the same bytes
for a seed whatever the number of workers, and a manifest that `dtrain prepare` reads. What
prepare's near-duplicate grouping makes of the copies is prepare's tests' business."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import synthetic_patients as sp  # noqa: E402

from dtrain.prepare import PrepareConfig, prepare  # noqa: E402

N = 300  # two units of work (sp.CHUNK = 250), 30 copies: each kind five times


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patients")
    sp.generate(out, N, seed=3)
    return out


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def thumbnails(out: Path, paths: list[str]) -> np.ndarray:
    """Standardised 16x16 grayscale thumbnails: a dot product is a Pearson correlation."""
    x = np.stack(
        [
            np.asarray(Image.open(out / p).convert("L").resize((16, 16), Image.Resampling.BOX))
            for p in paths
        ]
    ).reshape(len(paths), -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_seed_gives_the_same_bytes_with_any_number_of_workers(generated, tmp_path):
    sp.generate(tmp_path, N, seed=3, workers=2)
    for name in ["manifest.csv"] + [row["path"] for row in rows_of(generated)]:
        assert (tmp_path / name).read_bytes() == (generated / name).read_bytes(), name
    patients = np.arange(4)
    films = sp.draw_films(patients, np.zeros(4, np.int8), 64, seed=3)
    assert not np.array_equal(films, sp.draw_films(patients, np.zeros(4, np.int8), 64, seed=4))


def test_the_manifest_lists_every_image_once_under_its_own_patient(generated):
    rows = rows_of(generated)
    with open(generated / "manifest.csv", newline="") as handle:
        assert next(csv.reader(handle)) == list(sp.MANIFEST_COLUMNS)
    assert len(rows) == N
    assert [r["path"] for r in rows] == [sp.image_path(i) for i in range(N)]
    assert all((generated / r["path"]).is_file() for r in rows)
    assert len({r["patient_id"] for r in rows}) == N
    originals = [r for r in rows if not r["copy_kind"]]
    assert len(originals) == N - round(N * 0.1)
    assert all(r["copy_of"] == "" for r in originals)
    nodules = sum(r["label"] == "nodule" for r in originals) / len(originals)
    assert {r["label"] for r in rows} == set(sp.CLASSES) and 0.35 < nodules < 0.65
    with Image.open(generated / originals[0]["path"]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "L", (64, 64))
    assert sp.image_path(999).split("/")[1] != sp.image_path(1000).split("/")[1]


def test_copies_of_every_kind_keep_the_label_under_a_new_patient(generated):
    rows = rows_of(generated)
    by_path = {r["path"]: r for r in rows}
    copies = [r for r in rows if r["copy_kind"]]
    assert sorted({r["copy_kind"] for r in copies}) == sorted(sp.COPY_KINDS)
    for copy in copies:
        original = by_path[copy["copy_of"]]
        assert original["copy_kind"] == ""  # a copy of an original, never of a copy
        assert copy["label"] == original["label"]
        assert copy["patient_id"] != original["patient_id"]
        same = (generated / copy["path"]).read_bytes() == (
            generated / original["path"]
        ).read_bytes()
        assert same == (copy["copy_kind"] == "exact")
    # the mild kinds stay near their original, and a flipped copy flipped back does too
    near = [c for c in copies if c["copy_kind"] in ("exact", "resized", "reencoded", "brightness")]
    x = thumbnails(generated, [c["path"] for c in near])
    y = thumbnails(generated, [c["copy_of"] for c in near])
    assert np.einsum("ij,ij->i", x, y).min() > 0.95
    flipped = [c for c in copies if c["copy_kind"] == "flipped"]
    x = thumbnails(generated, [c["path"] for c in flipped]).reshape(-1, 16, 16)[:, :, ::-1]
    y = thumbnails(generated, [c["copy_of"] for c in flipped]).reshape(-1, 16, 16)
    assert np.einsum("ijk,ijk->i", x, y).min() > 0.95


def test_patients_share_the_layout_but_differ(generated):
    originals = [r["path"] for r in rows_of(generated) if not r["copy_kind"]]
    x = thumbnails(generated, originals)
    pairs = (x @ x.T)[np.triu_indices(len(x), 1)]
    assert 0.3 < pairs.mean() < 0.9  # one layout (positive), each patient's own film
    assert pairs.max() < 0.99


def test_a_nodule_is_a_small_bright_blob_on_the_same_film():
    patients = np.arange(16)
    normal = sp.draw_films(patients, np.zeros(16, np.int8), 64, seed=0).astype(int)
    nodule = sp.draw_films(patients, np.ones(16, np.int8), 64, seed=0).astype(int)
    change = nodule - normal
    assert (change.reshape(16, -1).max(axis=1) > 20).all()
    assert (change >= 0).all()
    assert ((change > 5).reshape(16, -1).mean(axis=1) < 0.03).all()


def test_prepare_reads_the_manifest(tmp_path):
    manifest = sp.generate(tmp_path / "patients", 200, seed=5)
    out = prepare(
        PrepareConfig(
            source=str(manifest),
            out=str(tmp_path / "dataset"),
            classes=list(sp.CLASSES),
            progress=False,
        )
    )
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == list(sp.CLASSES)

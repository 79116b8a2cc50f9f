"""`dtrain prepare` on a hospital's manifest: its `split` column is honoured as it is, its
patients are the unit of splitting together with the near-duplicates, its other columns reach
`manifest.parquet`, and splits may be empty (a test-only set, a set without test)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_folder

from dtrain.commands.main import main
from dtrain.errors import ConfigError, DataError
from dtrain.prepare import PrepareConfig, prepare

SPLIT_OF_PATIENT = {"P0": "Train", "P1": " train", "P2": "VAL", "P3": "train", "P4": "val"}
SPLIT_OF_PATIENT["P5"] = "test"


def patient_of(path: str) -> str:
    """Six patients, each with both classes; a near copy belongs to the next patient, so that
    near-duplicates join P0 with P1 and P1 with P2 (`benign/000_dup.png` is P1's)."""
    number = int(Path(path).stem[:3]) + Path(path).stem.endswith("_dup")
    return f"P{number % 6}"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    """28 small PNGs (two classes, 12 each, the first two of each with a near copy) and the
    rows of a manifest: path, label, patient_id, age, scanner, and a `source` column (a name
    dtrain's manifest uses for itself)."""
    root = write_folder(
        tmp_path_factory.mktemp("hospital"), {"benign": 12, "malignant": 12}, duplicates=2
    )
    return root


def rows(root: Path) -> list[dict]:
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    return [
        {
            "path": path,
            "label": path.split("/")[0],
            "patient_id": patient_of(path),
            "age": f"{40 + i:03d}",  # a CSV's text is kept as written: 040 stays 040
            "scanner": "GE" if i % 2 else "Siemens",
            "source": "ward 3",
        }
        for i, path in enumerate(images)
    ]


def write_manifest(root: Path, name: str, table: list[dict]) -> Path:
    columns = list(table[0])
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in table]
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def with_splits(root: Path) -> list[dict]:
    return [{**r, "split": SPLIT_OF_PATIENT[r["patient_id"]]} for r in rows(root)]


def run(source: Path, out: Path, **kw) -> Path:
    return prepare(PrepareConfig(source=str(source), out=str(out), progress=False, **kw))


def read(out: Path) -> tuple[dict, dict[str, dict]]:
    """dataset.json, and manifest.parquet's rows by source path."""
    meta = json.loads((out / "dataset.json").read_text())
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    return meta, {r["source"]: r for r in table}


def test_split_column_gives_exactly_those_splits_and_keeps_the_other_columns(
    hospital, tmp_path, capsys
):
    table = with_splits(hospital)
    manifest = write_manifest(hospital, "with_splits.csv", table)
    out = run(manifest, tmp_path / "ds", noise="symmetric", noise_rate=0.3, shard_size=5)
    printed = capsys.readouterr().out
    meta, by_path = read(out)
    assert len(by_path) == len(table)
    for row in table:
        kept = by_path[row["path"]]
        assert kept["split"] == row["split"].strip().lower()
        assert kept["shard"].startswith(f"{kept['split']}-")
        # the manifest's own columns, a clashing name under source_<name>
        assert kept["patient_id"] == row["patient_id"] and kept["age"] == row["age"]
        assert kept["scanner"] == row["scanner"] and kept["source_source"] == "ward 3"
        assert kept["source_split"] == row["split"]
    assert str(pq.read_schema(out / "manifest.parquet").field("age").type) == "string"
    columns = ["patient_id", "age", "scanner", "source_source", "source_split"]
    assert meta["manifest_columns"] == columns
    assert all(name in printed for name in columns)
    assert meta["split_by"] == {
        "fractions": None,
        "column": "split",
        "group_column": "patient_id",
        "groups": len({r["group"] for r in by_path.values()}),
    }
    counts = {s: sum(r["split"].strip().lower() == s for r in table) for s in ("train", "val")}
    assert {s: meta["splits"][s]["count"] for s in counts} == counts
    assert meta["splits"]["train"]["noise_rate"] > 0 and meta["splits"]["test"]["noise_rate"] == 0
    # benign/001.png (P1, train) and its near copy (P2, val) cross the user's splits, as do the
    # malignant pair: the split stands, with a warning that counts them
    assert "warning: 2 near-duplicate image pairs lie in different splits" in printed
    assert by_path["benign/001.png"]["group"] == by_path["benign/001_dup.png"]["group"]


def test_split_from_the_patient_column_keeps_each_patient_and_copy_in_one_split(
    hospital, tmp_path, capsys
):
    table = [{k: v for k, v in r.items() if k != "source"} for r in rows(hospital)]
    out = run(write_manifest(hospital, "patients.csv", table), tmp_path / "ds", seed=1)
    meta, by_path = read(out)
    split_of_patient: dict[str, set] = {}
    group_of_patient: dict[str, set] = {}
    for row in by_path.values():
        split_of_patient.setdefault(row["patient_id"], set()).add(row["split"])
        group_of_patient.setdefault(row["patient_id"], set()).add(row["group"])
    assert all(len(s) == 1 for s in split_of_patient.values()), split_of_patient
    for name in ("benign", "malignant"):
        for i in range(2):
            original, copy = by_path[f"{name}/{i:03d}.png"], by_path[f"{name}/{i:03d}_dup.png"]
            assert original["split"] == copy["split"] and original["group"] == copy["group"]
    # near copies join P0, P1 and P2 into one group; P3, P4 and P5 stay groups of their own
    assert group_of_patient["P0"] == group_of_patient["P1"] == group_of_patient["P2"]
    assert len({g for s in group_of_patient.values() for g in s}) == 4
    assert meta["split_by"]["groups"] == 4 and meta["dedup"]["groups"] == 24
    assert meta["split_by"]["group_column"] == "patient_id"
    assert meta["split_by"]["fractions"] == [0.7, 0.1, 0.2]
    assert "6 patient_id values; joined with the near-duplicates, 4 groups" in (
        capsys.readouterr().out
    )


def test_a_rerun_with_other_splits_patients_or_columns_is_another_dataset(hospital, tmp_path):
    table = with_splits(hospital)
    manifest = write_manifest(hospital, "rerun.csv", table)
    out = run(manifest, tmp_path / "ds")
    assert run(manifest, out) == out  # the same request: nothing to do
    before = (out / "dataset.json").read_text()
    changes = {
        "split_column_sha256": [
            {**r, "split": "test" if r["split"] == "VAL" else r["split"]} for r in table
        ],
        "group_column_sha256": [{**r, "patient_id": r["patient_id"] + "x"} for r in table],
        "manifest_columns_sha256": [{**r, "age": f"{int(r['age']) + 1:03d}"} for r in table],
    }
    for key, changed in changes.items():
        write_manifest(hospital, "rerun.csv", changed)
        with pytest.raises(DataError, match=f"differs in: .*{key}.*--overwrite"):
            run(manifest, out)
    write_manifest(hospital, "rerun.csv", table)
    with pytest.raises(DataError, match="differs in: group_column, group_column_sha256"):
        run(manifest, out, group_column="age")
    assert (out / "dataset.json").read_text() == before


@pytest.mark.parametrize(
    "change, kw, error, match",
    [
        (
            lambda t: [{**r, "split": "training"} if i == 3 else r for i, r in enumerate(t)],
            {},
            DataError,
            r"split_bad.csv row 5: split 'training' is not one of train, val, test",
        ),
        (
            lambda t: t,
            {"split": (0.8, 0.2, 0.0)},
            ConfigError,
            r"--split 0.8,0.2,0 and the split column of .*split_bad.csv both say how to split",
        ),
        (
            lambda t: t,
            {"group_column": "ward"},
            DataError,
            r"split_bad.csv has no column 'ward' for --group-column; it has \['path'",
        ),
        (
            lambda t: [{**r, "patient_id": ""} if i == 6 else r for i, r in enumerate(t)],
            {},
            DataError,
            r"split_bad.csv row 8: empty patient_id",
        ),
        (
            lambda t: [{**r, "source_source": 1} for r in t],
            {},
            DataError,
            r"has columns source and source_source; .* rename one",
        ),
    ],
)
def test_bad_manifest_columns_name_the_row_or_column(hospital, tmp_path, change, kw, error, match):
    manifest = write_manifest(hospital, "split_bad.csv", change(with_splits(hospital)))
    with pytest.raises(error, match=match):
        run(manifest, tmp_path / "ds", **kw)
    assert not (tmp_path / "ds").exists()


def test_a_patient_in_two_of_the_users_splits_is_refused(hospital, tmp_path):
    table = with_splits(hospital)
    p3 = [i for i, r in enumerate(table) if r["patient_id"] == "P3"]
    table[p3[-1]]["split"] = "test"
    manifest = write_manifest(hospital, "leak.csv", table)
    with pytest.raises(DataError) as caught:
        run(manifest, tmp_path / "ds")
    # CSV rows are numbered as lines, the header being line 1
    assert (
        f"patient_id 'P3' is in train (leak.csv row {p3[0] + 2}) and in test "
        f"(leak.csv row {p3[-1] + 2})"
    ) in str(caught.value).replace(f"{hospital}/", "")
    assert not (tmp_path / "ds").exists()


def test_group_column_needs_a_manifest(hospital, tmp_path):
    with pytest.raises(ConfigError, match="--group-column patient_id names a manifest column"):
        run(hospital, tmp_path / "ds", group_column="patient_id")


def test_test_only_split_is_read_by_the_loader(hospital, tmp_path, capsys):
    from dtrain.dataset.loader import make_loader, split_urls

    out = run(hospital, tmp_path / "ds", split=(0, 0, 1), noise="instance", noise_rate=0.2)
    meta = json.loads((out / "dataset.json").read_text())
    assert [meta["splits"][s]["count"] for s in ("train", "val")] == [0, 0]
    assert meta["splits"]["test"]["count"] == 28
    assert set(meta["shard_pattern"]) == {"test"}
    assert {info["split"] for info in meta["shards"].values()} == {"test"}
    assert "no noise added: no images in train or val" in capsys.readouterr().out
    loader = make_loader(split_urls(out, "test"), train=False, batch_size=8, image_size=16)
    keys = [k for batch in loader for k, ok in zip(batch["key"], batch["valid"], strict=True) if ok]
    manifest = pq.read_table(out / "manifest.parquet").column("key").to_pylist()
    assert sorted(keys) == sorted(manifest)
    with pytest.raises(DataError, match="has no train shards"):
        split_urls(out, "train")


def test_cli_split_without_test_grouped_by_patient(hospital, tmp_path, capsys):
    table = [{k: v for k, v in r.items() if k != "source"} for r in rows(hospital)]
    manifest = write_manifest(hospital, "cli.csv", table)
    out = tmp_path / "ds"
    argv = ["prepare", str(manifest), "--out", str(out), "--no-progress", "--split", "0.8,0.2,0"]
    main([*argv, "--group-column", "patient_id"])
    meta, by_path = read(out)
    assert meta["splits"]["test"]["count"] == 0 and "test" not in meta["shard_pattern"]
    assert not list(out.glob("test-*.tar"))
    assert meta["splits"]["train"]["count"] + meta["splits"]["val"]["count"] == 28
    assert meta["splits"]["val"]["count"] > 0
    assert meta["split_by"]["fractions"] == [0.8, 0.2, 0.0]
    split_of_patient = {r["patient_id"]: r["split"] for r in by_path.values()}
    assert all(r["split"] == split_of_patient[r["patient_id"]] for r in by_path.values())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        main(["prepare", str(manifest), "--out", str(tmp_path / "x"), "--group-column", "bed"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dtrain prepare: error: manifest {manifest} has no column 'bed' for --group-column; "
        "it has ['path', 'label', 'patient_id', 'age', 'scanner']"
    ]

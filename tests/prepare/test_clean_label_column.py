"""`dtrain prepare --clean-label-column COL`: a benchmark manifest that ships both labels. `label`
is the noisy one trained on, COL the clean one; the noise is recorded from the difference, and a
run on the set reports clean metrics and the wrong-label AUROC as it does on injected noise."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_folder

from dtrain.commands.main import main
from dtrain.errors import ConfigError, DataError
from dtrain.prepare import PrepareConfig, prepare

CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """40 PNGs of two classes and `noisy.csv`: path, label (every third image's label flipped),
    clean (the folder's class), site."""
    root = write_folder(tmp_path_factory.mktemp("benchmark"), {c: 20 for c in CLASSES})
    lines = ["path,label,clean,site"]
    for i, image in enumerate(sorted(root.rglob("*.png"))):
        clean = image.parent.name
        noisy = CLASSES[1 - CLASSES.index(clean)] if i % 3 == 0 else clean
        lines.append(f"{image.relative_to(root).as_posix()},{noisy},{clean},site{i % 2}")
    (root / "noisy.csv").write_text("\n".join(lines) + "\n")
    return root


def shipped(root: Path) -> dict[str, tuple[str, str]]:
    """path -> (label, clean) as the manifest says."""
    rows = [line.split(",") for line in (root / "noisy.csv").read_text().splitlines()[1:]]
    return {r[0]: (r[1], r[2]) for r in rows}


def test_the_noise_is_the_manifests_own_measured_from_the_clean_column(benchmark, tmp_path):
    out = prepare(
        PrepareConfig(
            source=str(benchmark / "noisy.csv"),
            out=str(tmp_path / "ds"),
            clean_label_column="clean",
            split=(0.6, 0.2, 0.2),
            progress=False,
        )
    )
    meta = json.loads((out / "dataset.json").read_text())
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    labels = shipped(benchmark)
    for row in rows:  # each sample keeps both labels as shipped; none is changed
        label, clean = labels[row["source"]]
        assert meta["classes"][row["noisy_label"]] == label
        assert meta["classes"][row["clean_label"]] == clean
        assert row["is_noisy"] == (label != clean)
    train = [r for r in rows if r["split"] == "train"]
    measured = sum(r["is_noisy"] for r in train) / len(train)
    assert meta["noise"]["model"] == "manifest" and meta["noise"]["column"] == "clean"
    assert meta["noise"]["rate"] == pytest.approx(measured) and 0 < measured < 1
    assert meta["noise"]["splits"] == ["train", "val", "test"]
    assert "clean" not in rows[0] and rows[0]["site"] in ("site0", "site1")  # COL is no extra


@pytest.mark.parametrize(
    "source, extra, error, match",
    [
        ("noisy.csv", {"clean_label_column": "truth"}, DataError, "no column 'truth'"),
        (
            "noisy.csv",
            {"clean_label_column": "clean", "noise": "symmetric"},
            ConfigError,
            "drop --noise",
        ),
        (".", {"clean_label_column": "clean"}, ConfigError, "no .csv/.parquet manifest"),
    ],
    ids=["missing-column", "with-injected-noise", "not-a-manifest"],
)
def test_a_clean_label_column_that_cannot_be_used_is_refused(
    benchmark, tmp_path, source, extra, error, match
):
    config = PrepareConfig(source=str(benchmark / source), out=str(tmp_path / "ds"), **extra)
    with pytest.raises(error, match=match):
        prepare(config)
    assert not (tmp_path / "ds").exists()


@pytest.mark.slow
def test_a_run_on_it_reports_clean_metrics_and_the_wrong_label_auroc(benchmark, tmp_path, capsys):
    """End to end through the command line: prepare with the column, train one epoch."""
    out, run = tmp_path / "ds", tmp_path / "run"
    main(
        ["prepare", str(benchmark / "noisy.csv"), "--out", str(out), "--no-progress"]
        + ["--clean-label-column", "clean", "--split", "0.6,0.2,0.2"]
    )
    main(
        [
            "train",
            f"data.path={out}",
            "data.image_size=32",
            "data.batch_size=8",
            "model.backbone=test_resnet",
            "train.epochs=1",
            "train.progress=false",
            "method.group_size=4",
            "method.score_epochs=1",
            f"train.run_dir={run}",
        ]
    )
    printed = capsys.readouterr().out
    assert "(clean " in printed and "test (clean labels)" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert "clean_accuracy" in summary["test_best"]
    assert set(summary["mislabel_auroc"]) >= {"loss"}


def test_a_dataset_prepared_before_the_option_existed_is_still_found_intact(benchmark, tmp_path):
    """Without the option the request is what it was: an older dtrain's dataset is not
    rebuilt (nor refused as a different one)."""
    config = PrepareConfig(source=str(benchmark / "noisy.csv"), out=str(tmp_path / "ds"))
    out = prepare(config)
    meta = json.loads((out / "dataset.json").read_text())
    assert "clean_label_column" not in meta["request"]
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert prepare(config) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == shards

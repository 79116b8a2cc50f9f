"""A trained run used on new data: `dtrain eval --data` on another prepared dataset, `dtrain
predict` on an image folder (the same probabilities as eval), `dtrain.load` and
model.safetensors, and training on datasets that lack a val or a test split."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    small_overrides,
    stripes,
    stripes_dataset,
    write_folder,
    write_stripes,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dtrain
from dtrain.commands.main import main
from dtrain.config import load_config
from dtrain.errors import DataError
from dtrain.prepare import PrepareConfig, prepare
from dtrain.runs.evaluate import evaluate_run
from dtrain.train import train
from dtrain.train.checkpoint import selected_weights

CLASSES = ["horizontal", "vertical"]


def dtrain_cli(capsys, *args) -> tuple[int, str, str]:
    """`dtrain ARGS` in this process (no second torch import): exit code, stdout, stderr."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_colour_stripes(root: Path, per_class: int, side: int = 96) -> Path:
    """`root/<class>/*.jpg`: the stripes task as tinted RGB JPEGs three times the run's size."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            gray = stripes(20_000 + 100 * c + i, vertical=bool(c), side=side).astype(float)
            rgb = np.stack([gray, gray * 0.7, gray * 0.4], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Grayscale 32 px PNG stripes, 32 per class, 20% symmetric noise."""
    return stripes_dataset(tmp_path_factory.mktemp("stripes"), 32, shard_size=16)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """One tiny training (1 epoch) that every test here uses."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train(load_config(None, small_overrides(data, run_dir, 16, "train.epochs=1")))
    return run_dir


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> tuple[Path, Path]:
    """(source folder, dataset) of another set with the run's classes: RGB JPEGs at 96 px,
    prepared without --resize, so eval decodes them to one channel, downscaled while decoding."""
    root = tmp_path_factory.mktemp("other")
    source = write_colour_stripes(root / "img", 10)
    # a test-only set, as another hospital's external test set is prepared
    main(["prepare", str(source), "--out", str(root / "ds"), "--split", "0,0,1", "--no-progress"])
    return source, root / "ds"


@pytest.fixture(scope="module")
def evaluated(run, other, tmp_path_factory) -> Path:
    """`dtrain eval RUN --data OTHER` (test split): the folder it wrote."""
    out = tmp_path_factory.mktemp("eval") / "other-test"
    evaluate_run(run, "test", "best", data=other[1], out=out)
    return out


def test_eval_on_another_dataset_writes_metrics_confusion_and_predictions(evaluated, other):
    meta = json.loads((other[1] / "dataset.json").read_text())
    assert meta["images"]["channels"] == 3  # the run's are 1: decoded to the run's channels
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["samples"] == meta["splits"]["test"]["count"] == 20  # the whole set
    assert {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece"} <= set(metrics)
    assert not any(k.startswith("clean_") for k in metrics)  # no injected noise, no clean labels

    rows = pq.read_table(evaluated / "predictions.parquet").to_pylist()
    assert len(rows) == metrics["samples"]
    manifest = pq.read_table(other[1] / "manifest.parquet").to_pylist()
    test_items = {r["key"]: r["source"] for r in manifest if r["split"] == "test"}
    assert {r["key"]: r["path"] for r in rows} == test_items
    for r in rows:
        probs = [r[f"prob_{c}"] for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert r["label"] == r["path"].split("/")[0]  # the class folder it came from
        assert r["predicted"] == CLASSES[int(np.argmax(probs))]
        assert r["suspicion"] == pytest.approx(1 - r[f"prob_{r['label']}"])
    correct = sum(r["label"] == r["predicted"] for r in rows)
    assert metrics["accuracy"] == pytest.approx(correct / len(rows))

    with open(evaluated / "confusion_matrix.csv") as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == CLASSES and [row[0] for row in table[1:]] == CLASSES
    for t, true in enumerate(CLASSES):
        for p, predicted in enumerate(CLASSES):
            expected = sum(r["label"] == true and r["predicted"] == predicted for r in rows)
            assert int(table[1 + t][1 + p]) == expected
    assert Image.open(evaluated / "confusion_matrix.png").size[0] > 200


def test_predict_on_a_folder_gives_the_probabilities_of_eval(
    run, other, evaluated, tmp_path, capsys
):
    out = tmp_path / "preds.parquet"
    code, stdout, stderr = dtrain_cli(
        capsys, "predict", run, other[0], "--out", out, "--batch-size", 3, "--num-workers", 0
    )
    assert code == 0, stderr
    assert f"wrote {out}: 20 images" in stdout
    predicted = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert len(predicted) == 20  # the whole folder, every split
    evaluated_rows = pq.read_table(evaluated / "predictions.parquet").to_pylist()
    columns = [f"prob_{c}" for c in CLASSES]
    for r in evaluated_rows:
        mine = predicted[r["path"]]
        np.testing.assert_allclose([mine[c] for c in columns], [r[c] for c in columns], atol=1e-6)
        assert (mine["label"], mine["predicted"]) == (r["label"], r["predicted"])
        assert mine["suspicion"] == pytest.approx(r["suspicion"], abs=1e-6)


def test_predict_on_a_flat_folder_has_no_labels_and_names_a_broken_image(
    run, other, tmp_path, capsys
):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("000", "001"):
        (flat / f"{name}.jpg").write_bytes((other[0] / "vertical" / f"{name}.jpg").read_bytes())
    (flat / "002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "flat.parquet"
    args = ("predict", run, flat, "--out", out, "--num-workers", 0)
    code, _, stderr = dtrain_cli(capsys, *args)
    assert code == 2 and "002.jpg" in stderr and "--skip-bad-images" in stderr
    assert not out.exists()
    code, stdout, stderr = dtrain_cli(capsys, *args, "--skip-bad-images")
    assert code == 0 and "002.jpg" in stderr and "1 unreadable skipped" in stdout
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == ["000.jpg", "001.jpg"]
    assert "label" not in table.column_names and "suspicion" not in table.column_names


def test_load_gives_the_model_and_the_preprocessing_of_predict(
    run, data, other, evaluated, tmp_path
):
    model, preprocess = dtrain.load(run)
    assert not model.training and preprocess.classes == CLASSES
    row = pq.read_table(evaluated / "predictions.parquet").to_pylist()[0]
    with torch.no_grad():
        probs = model(preprocess(other[0] / row["path"])).softmax(-1)[0]
    assert probs.tolist() == pytest.approx([row[f"prob_{c}"] for c in CLASSES], abs=1e-6)
    png = data.parent / "img" / "vertical" / "000.png"  # a PIL image of a PNG is its file's
    torch.testing.assert_close(preprocess(Image.open(png)), preprocess(png), rtol=0, atol=0)
    x = preprocess([Image.open(other[0] / row["path"])] * 2)
    assert x.shape == (2, 1, 32, 32) and x.min() >= -1 and x.max() <= 1

    exported = load_file(run / "model.safetensors")
    best = selected_weights(torch.load(run / "best.pt", weights_only=True))
    assert exported.keys() == best.keys()
    for name, tensor in best.items():
        assert torch.equal(exported[name], tensor), name
    with safe_open(str(run / "model.safetensors"), framework="pt") as handle:
        meta = {k: json.loads(v) for k, v in handle.metadata().items()}
    assert meta["classes"] == CLASSES and meta["method"] == "con_elr"  # the default
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["channels"] == 1
    assert meta["model"]["backbone"] == "test_resnet"

    alone = tmp_path / "deployed"  # model.safetensors is all dtrain.load needs
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    model_alone, preprocess_alone = dtrain.load(alone)
    image = other[0] / row["path"]
    with torch.no_grad():
        torch.testing.assert_close(
            model_alone(preprocess_alone(image)), model(preprocess(image)), rtol=0, atol=0
        )


def test_import_dtrain_stays_light():
    code = "import sys, dtrain; print(callable(dtrain.load), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["True", "False"], result.stderr


def test_eval_refuses_a_dataset_with_other_classes(run, tmp_path, capsys):
    source = write_folder(tmp_path / "img", {"benign": 4, "malignant": 4})
    config = PrepareConfig(source=str(source), out=str(tmp_path / "ds"), progress=False)
    code, _, stderr = dtrain_cli(capsys, "eval", run, "--data", prepare(config))
    assert code == 2
    assert "['benign', 'malignant']" in stderr and str(CLASSES) in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_dataset_without_val_and_test_trains_and_skips_the_test(tmp_path, capsys):
    source = write_stripes(tmp_path / "img", 16)
    config = PrepareConfig(
        source=str(source), out=str(tmp_path / "ds"), split=(1, 0, 0), progress=False
    )
    train_only = prepare(config)
    run = tmp_path / "run"
    overrides = small_overrides(train_only, run, 16)
    train(load_config(None, [*overrides, "train.stop_after_steps=1"]))
    assert not (run / "model.safetensors").exists()  # written when the run finishes
    capsys.readouterr()
    train(load_config(None, overrides), resume=True)
    printed = capsys.readouterr().out
    assert printed.count(f"no test split in {train_only}: the final test is skipped") == 1
    assert printed.count(f"no val split in {train_only}: best.pt follows the last epoch") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_best"] is None and summary["test_last"] is None
    assert "no test split" in summary["test_skipped"]
    assert summary["epochs"] == summary["best_epoch"] == 2
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["state"]["epoch"] == 2  # no val: best.pt follows the last epoch
    exported = load_file(run / "model.safetensors")  # written by the resumed run
    assert exported.keys() == selected_weights(best).keys()
    for name, tensor in selected_weights(best).items():
        assert torch.equal(exported[name], tensor), name


def test_a_test_only_dataset_is_refused_for_training(other, tmp_path):
    test_only = other[1]
    with pytest.raises(DataError, match=f"{test_only} has no train split: it is test-only"):
        train(load_config(None, small_overrides(test_only, tmp_path / "run", 16)))
    assert not (tmp_path / "run").exists()

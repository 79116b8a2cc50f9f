"""`dtrain index`: shards written by someone else's pipeline (a plain `tarfile` writer, no
dataset.json, assorted image formats, labels in `.cls` or a JSON field) become a dataset folder
that `dtrain train` streams from where they lie: exact counts, checksums, clear errors naming
the shard, and no image copied."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import small_overrides, stripes
from PIL import Image

from dtrain.commands.main import main
from dtrain.dataset.loader import make_loader, read_dataset_json, split_urls
from dtrain.errors import DataError
from dtrain.index.scan import index_shards

# split -> shards -> samples per shard; uneven on purpose
LAYOUT = {"train": [10, 7], "val": [6], "test": [6]}
# one format per shard, in LAYOUT's order: the loader must decode each
FORMATS = {"train-0": "jpeg", "train-1": "bmp", "val-0": "webp", "test-0": "ppm"}
PIL_FORMAT = {"jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP", "ppm": "PPM"}
CLASSES = ("horizontal", "vertical")


def image_bytes(seed: int, vertical: bool, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(stripes(seed, vertical)).save(buffer, format=PIL_FORMAT[fmt])
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A shard as anyone's pipeline may write it: tarfile, `KEY.EXT` members, nothing else."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_foreign_shards(root: Path, label: str = "cls") -> dict[str, int]:
    """LAYOUT's shards in `root` as `<split>-<n>.tar`; the label as `.cls` (an index) or as
    `.json` {"label": class name}. Returns key -> class index."""
    root.mkdir(parents=True)
    labels, seed = {}, 0
    for split, sizes in LAYOUT.items():
        for n, size in enumerate(sizes):
            fmt, samples = FORMATS[f"{split}-{n}"], []
            for _ in range(size):
                seed += 1
                cls = seed % 2
                key = f"{split}/scan{seed:04d}"
                if label == "cls":
                    tag = {"cls": str(cls).encode()}
                else:
                    tag = {"json": json.dumps({"label": CLASSES[cls], "site": "A"}).encode()}
                samples.append((key, {fmt: image_bytes(seed, bool(cls), fmt), **tag}))
                labels[key] = cls
            write_tar(root / f"{split}-{n}.tar", samples)
    return labels


def patterns(root: Path, prefix: str = "") -> list[str]:
    """`TRAIN --val VAL --test TEST` for the shards in `root`."""
    return [
        f"{prefix}{root}/train-{{0..1}}.tar",
        "--val",
        f"{prefix}{root}/val-0.tar",
        "--test",
        f"{prefix}{root}/test-0.tar",
    ]


def index(*args: str) -> None:
    main(["index", *args, "--no-progress"])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("foreign")
    return root / "shards", write_foreign_shards(root / "shards")


@pytest.fixture(scope="module")
def indexed(foreign, tmp_path_factory) -> Path:
    shards, _ = foreign
    out = tmp_path_factory.mktemp("indexed") / "ds"
    index(*patterns(shards), "--out", str(out))
    return out


@pytest.fixture(scope="module")
def piped(foreign, tmp_path_factory) -> Path:
    shards, _ = foreign
    out = tmp_path_factory.mktemp("piped") / "ds"
    index(*patterns(shards, "pipe:cat "), "--out", str(out))
    return out


def train_one_epoch(data: Path, run: Path) -> dict:
    main(["train", *small_overrides(data, run, 8, "train.epochs=1")])
    return json.loads((run / "summary.json").read_text())


def loaded_labels(dataset: Path, split: str) -> dict[str, int]:
    """Every valid sample's label as the loader yields it from the indexed dataset."""
    loader = make_loader(
        split_urls(dataset, split),
        train=False,
        batch_size=4,
        image_size=16,
        meta=read_dataset_json(str(dataset)),
        strict=True,
    )
    return {
        key: label
        for batch in loader
        for key, label, valid in zip(
            batch["key"], batch["label"].tolist(), batch["valid"], strict=True
        )
        if valid
    }


def test_counts_checksums_and_labels_are_exact_and_no_image_is_copied(foreign, indexed):
    shards, labels = foreign
    meta = json.loads((indexed / "dataset.json").read_text())
    listed = {info["url"]: info for info in meta["shards"].values()}
    files = sorted(shards.glob("*.tar"))
    assert sorted(listed) == [str(f) for f in files]  # absolute URLs of every shard, nothing else
    for split, sizes in LAYOUT.items():
        for n, size in enumerate(sizes):
            info = listed[str(shards / f"{split}-{n}.tar")]
            assert (info["split"], info["count"]) == (split, size)
            digest = hashlib.sha256((shards / f"{split}-{n}.tar").read_bytes()).hexdigest()
            assert info["sha256"] == digest
        assert meta["splits"][split]["count"] == sum(sizes)
    assert meta["classes"] == ["0", "1"]
    assert meta["images"]["channels"] == 1
    assert meta["source"]["kind"] == "shards" and meta["label_key"] == "cls"
    assert meta["noise"] == {"model": "none", "rate": 0.0}
    rows = pq.read_table(indexed / "manifest.parquet").to_pylist()
    assert {r["key"]: r["noisy_label"] for r in rows} == labels
    assert all(r["clean_label"] == r["noisy_label"] and not r["is_noisy"] for r in rows)
    assert len({r["group"] for r in rows}) == len(rows)
    assert all(r["source"] == f"{listed_url(meta, r['shard'])}#{r['key']}" for r in rows)
    assert not list(indexed.rglob("*.tar")) and not list(indexed.parent.rglob("*.partial"))
    assert sorted(p.name for p in indexed.iterdir()) == ["dataset.json", "manifest.parquet"]


def listed_url(meta: dict, name: str) -> str:
    return meta["shards"][name]["url"]


def test_the_loader_reads_every_format_and_label_where_the_shards_lie(foreign, indexed):
    _, labels = foreign
    for split in LAYOUT:
        assert loaded_labels(indexed, split) == {
            k: v for k, v in labels.items() if k.startswith(f"{split}/")
        }


def test_train_one_epoch_on_indexed_shards_then_eval_and_review_the_run(
    foreign, indexed, tmp_path, capsys
):
    _, labels = foreign
    run = tmp_path / "run"
    summary = train_one_epoch(indexed, run)
    tests = len([k for k in labels if k.startswith("test/")])
    assert summary["test_last"]["samples"] == tests
    scores = pq.read_table(run / "label_scores.parquet").to_pylist()
    train = {k: v for k, v in labels.items() if k.startswith("train/")}
    assert {r["key"]: r["noisy_label"] for r in scores} == train
    assert all(r["source"].endswith(f".tar#{r['key']}") for r in scores)
    # the commands that use a run read the shards where the index says they lie
    main(["eval", str(run), "--data", str(indexed), "--out", str(tmp_path / "eval")])
    predictions = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    names = read_dataset_json(str(indexed))["classes"]
    assert {r["key"]: r["label"] for r in predictions} == {
        k: names[v] for k, v in labels.items() if k.startswith("test/")
    }
    main(["review", str(run), "--top", "3", "--no-progress"])
    assert len(list((run / "review" / "thumbs").iterdir())) == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["relabel", str(indexed), str(run / "review" / "review.csv"), "--out", "x"])
    assert stop.value.code == 2
    assert "index them again" in capsys.readouterr().err


def test_pipe_urls_index_and_train_the_same(foreign, indexed, piped, tmp_path, monkeypatch):
    shards, labels = foreign
    monkeypatch.delenv("DTRAIN_ALLOW_PIPE", raising=False)
    with pytest.raises(DataError, match="runs a shell command; if you trust this dataset, set"):
        split_urls(piped, "val")  # a dataset folder may come from anyone
    monkeypatch.setenv("DTRAIN_ALLOW_PIPE", "1")
    meta, direct = read_dataset_json(str(piped)), read_dataset_json(str(indexed))
    assert all(info["url"].startswith("pipe:cat ") for info in meta["shards"].values())
    assert {n: (i["count"], i["sha256"]) for n, i in meta["shards"].items()} == {
        n: (i["count"], i["sha256"]) for n, i in direct["shards"].items()
    }
    assert loaded_labels(piped, "val") == {k: v for k, v in labels.items() if k.startswith("val/")}
    summary = train_one_epoch(piped, tmp_path / "run")
    assert summary["test_last"]["samples"] == LAYOUT["test"][0]


def test_json_label_field_with_class_names_in_the_given_order(tmp_path):
    labels = write_foreign_shards(tmp_path / "shards", label="json")
    out = tmp_path / "ds"
    # the reverse of the sorted names: indices must follow --classes, not the sort
    reverse = ["--classes", "vertical,horizontal"]
    index(*patterns(tmp_path / "shards"), "--label-key", "json:label", *reverse, "--out", str(out))
    meta = read_dataset_json(str(out))
    assert meta["classes"] == ["vertical", "horizontal"] and meta["label_key"] == "json:label"
    flipped = {k: 1 - v for k, v in labels.items()}
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["key"]: r["noisy_label"] for r in rows} == flipped
    assert loaded_labels(out, "train") == {
        k: v for k, v in flipped.items() if k.startswith("train/")
    }
    # without --classes: the sorted names
    index(
        *patterns(tmp_path / "shards"),
        "--label-key",
        "json:label",
        "--out",
        str(out),
        "--overwrite",
    )
    assert read_dataset_json(str(out))["classes"] == ["horizontal", "vertical"]
    with pytest.raises(SystemExit):  # another request over it needs --overwrite
        index(*patterns(tmp_path / "shards"), "--out", str(out))
    assert read_dataset_json(str(out))["label_key"] == "json:label"
    assert loaded_labels(out, "test") == {k: v for k, v in labels.items() if k.startswith("test/")}


def test_a_label_outside_the_given_classes_names_shard_and_key(foreign, tmp_path):
    shards, _ = foreign
    with pytest.raises(DataError, match=r"train-0.tar sample train/scan0001: label 1 is not"):
        index_shards(
            {"train": str(shards / "train-0.tar")},
            tmp_path / "ds",
            classes=["only"],
            progress=False,
        )
    with pytest.raises(DataError, match=r"sample train/scan0001: no .json member; --label-key"):
        index_shards(
            {"train": str(shards / "train-0.tar")},
            tmp_path / "ds",
            label_key="json:label",
            progress=False,
        )
    assert not (tmp_path / "ds").exists()


def test_unreadable_shards_are_named_in_one_line(foreign, tmp_path, capsys):
    shards, _ = foreign
    cut = tmp_path / "cut-0.tar"
    whole = (shards / "train-0.tar").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2 + 100])  # stops inside a member
    for train, expected in [
        (str(cut), rf"shard {cut} breaks off (in|after) member"),
        (str(tmp_path / "missing.tar"), rf"cannot open shard {tmp_path}/missing.tar"),
        (f"pipe:cat {tmp_path}/missing.tar", rf"shard pipe:cat {tmp_path}/missing.tar"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            index(train, "--out", str(tmp_path / "ds"))
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert message.startswith("dtrain index: error: ") and message.count("\n") == 1
        assert re.search(expected, message), message
    assert not (tmp_path / "ds").exists()


def test_a_key_in_two_shards_is_refused(foreign, tmp_path):
    shards, _ = foreign
    copy = tmp_path / "again.tar"
    copy.write_bytes((shards / "val-0.tar").read_bytes())
    with pytest.raises(DataError, match=rf"key 'val/scan0018' is in shard {shards}/val-0.tar and"):
        index_shards(
            {"train": str(shards / "val-0.tar"), "val": str(copy)},
            tmp_path / "ds",
            progress=False,
        )


def test_a_shard_changed_after_indexing_is_refused_by_the_loader(foreign, tmp_path):
    shards, _ = foreign
    mine = tmp_path / "shards"
    mine.mkdir()
    for shard in shards.glob("*.tar"):
        (mine / shard.name).write_bytes(shard.read_bytes())
    out = tmp_path / "ds"
    index(*patterns(mine), "--out", str(out))
    data = bytearray((mine / "val-0.tar").read_bytes())
    data[-2000] ^= 0xFF  # inside the last member's image
    (mine / "val-0.tar").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-0.tar has sha256 .* but its dataset.json says"):
        loaded_labels(out, "val")


def test_a_folder_that_is_not_a_dataset_is_left_alone(foreign, tmp_path):
    shards, _ = foreign
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a dtrain dataset"):
        index_shards({"train": str(shards / "train-0.tar")}, tmp_path / "ds", progress=False)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["notes.txt"]


def test_relative_patterns_are_recorded_absolute_and_colour_is_seen(tmp_path, monkeypatch):
    colour = np.stack([stripes(1, True), stripes(2, False), stripes(3, True)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(colour).save(buffer, format="PNG")
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "a-0.tar", [("k0", {"png": buffer.getvalue(), "cls": b"2"})])
    write_tar(tmp_path / "shards" / "a-1.tar", [("k1", {"png": buffer.getvalue(), "cls": b"0"})])
    monkeypatch.chdir(tmp_path)
    index_shards({"train": "shards/a-{0..1}.tar"}, Path("ds"), progress=False)
    meta = read_dataset_json(str(tmp_path / "ds"))
    urls = sorted(info["url"] for info in meta["shards"].values())
    assert urls == [str(tmp_path / "shards" / f"a-{i}.tar") for i in (0, 1)]
    assert meta["images"]["channels"] == 3
    assert meta["classes"] == ["0", "1", "2"]  # indices name their classes up to the largest
    # the same request again re-reads the shards in place, no --overwrite needed
    index_shards({"train": "shards/a-{0..1}.tar"}, Path("ds"), progress=False)
    assert read_dataset_json(str(tmp_path / "ds")) == meta


def test_a_shard_name_that_leaves_the_dataset_folder_is_refused(indexed, tmp_path):
    hostile = tmp_path / "ds"
    hostile.mkdir()
    meta = read_dataset_json(str(indexed))
    meta["shards"]["../outside.tar"] = meta["shards"].pop(sorted(meta["shards"])[0])
    (hostile / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"shard name '\.\./outside\.tar' is not a plain file"):
        read_dataset_json(str(hostile))


def test_shards_inside_the_output_folder_are_refused_not_deleted(foreign, tmp_path):
    shards, _ = foreign
    out = tmp_path / "ds"
    index(f"{shards}/train-{{0..1}}.tar", "--out", str(out))
    mine = out / "extra.tar"  # e.g. shards kept beside their index
    mine.write_bytes((shards / "val-0.tar").read_bytes())
    with pytest.raises(DataError, match=r"lies inside --out .*index into a folder of its own"):
        index_shards({"train": str(mine)}, out, overwrite=True, progress=False)
    assert mine.read_bytes() == (shards / "val-0.tar").read_bytes()


def test_many_samples_are_indexed_as_columns_not_python_rows(tmp_path):
    """20k samples in 8 shards, 2 read at once: the manifest holds each once, with its shard,
    label and source, and the Python heap grows by far less than a dict per sample (several
    hundred bytes each; a million samples would take gigabytes)."""
    import tracemalloc

    pixel = image_bytes(0, False, "bmp")
    shards, per_shard = 8, 2500
    for n in range(shards):
        samples = [
            (f"s{n}_{i:05d}", {"bmp": pixel, "cls": str((i * 7 + n) % 3).encode()})
            for i in range(per_shard)
        ]
        write_tar(tmp_path / f"train-{n}.tar", samples)
    # the modules it imports on first use are no sample's
    index_shards({"train": f"{tmp_path}/train-0.tar"}, tmp_path / "warm", progress=False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pattern = f"{tmp_path}/train-{{0..{shards - 1}}}.tar"
        index_shards({"train": pattern}, tmp_path / "ds", progress=False, jobs=2)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    manifest = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()
    assert len(manifest) == shards * per_shard
    row = manifest[per_shard + 3]
    assert row["key"] == "s1_00003" and row["shard"] == "train-000001" and row["split"] == "train"
    assert row["clean_label"] == row["noisy_label"] == (3 * 7 + 1) % 3
    assert row["source"] == f"{tmp_path}/train-1.tar#s1_00003"
    assert [r["group"] for r in manifest] == list(range(len(manifest)))
    assert peak / len(manifest) < 200, f"{peak / len(manifest):.0f} bytes of heap per sample"


@pytest.mark.ray
def test_ray_workers_index_the_same_bytes_and_name_a_bad_shard_in_one_line(
    foreign, indexed, tmp_path, ray_env
):
    shards, _ = foreign
    out = tmp_path / "ds"  # named as `indexed` is: dataset.json records the folder's name
    cut = tmp_path / "cut-0.tar"
    whole = (shards / "train-0.tar").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2 + 100])

    def ray_index(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "dtrain", "index", *args, "--no-progress"]
        command += ["--engine", "ray", "--jobs", "2"]
        env = {**ray_env, "PYTHONPATH": os.getcwd()}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    done = ray_index(*patterns(shards), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("dataset.json", "manifest.parquet"):
        assert (out / name).read_bytes() == (indexed / name).read_bytes(), name
    broken = ray_index(str(cut), "--out", str(tmp_path / "broken"))
    assert broken.returncode == 2
    error = [line for line in broken.stderr.splitlines() if line.startswith("dtrain index")]
    assert error and re.search(rf"shard {cut} breaks off (in|after) member", error[0]), error
    assert "Traceback" not in broken.stderr
    assert not (tmp_path / "broken").exists()

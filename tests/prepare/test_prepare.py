"""`dtrain prepare`: every source type round-trips into shards, splits respect near-duplicate
groups, reruns are byte-identical, and bad input fails with a message that names it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image, write_folder
from PIL import Image

from dtrain.commands.flags import flag_values
from dtrain.commands.prepare import COMMAND
from dtrain.errors import ConfigError, DataError
from dtrain.prepare import PrepareConfig, prepare


def read_shards(out: Path) -> dict[str, dict]:
    """key -> members, read with the standard library only."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                entry = samples.setdefault(key, {"shard": shard.name})
                entry[ext] = tar.extractfile(member).read()
    return samples


def run(source, out, **kw) -> Path:
    return prepare(
        PrepareConfig(source=str(source) if source else None, out=str(out), progress=False, **kw)
    )


def test_folder_round_trip_keeps_bytes_labels_and_records(image_folder, tmp_path):
    out = run(image_folder, tmp_path / "ds", shard_size=16)
    meta = json.loads((out / "dataset.json").read_text())
    samples = read_shards(out)
    assert meta["classes"] == ["benign", "malignant", "normal"]
    assert len(samples) == 105
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["key"] for r in manifest} == set(samples)
    for row in manifest:
        sample = samples[row["key"]]
        record = json.loads(sample["json"])
        assert sample["png"] == (image_folder / row["source"]).read_bytes()
        assert meta["classes"][record["clean_label"]] == Path(row["source"]).parent.name
        assert int(sample["cls"]) == record["noisy_label"] == row["noisy_label"]
        assert row["shard"] == sample["shard"]
        assert row["split"] == sample["shard"].split("-")[0]
    assert all(info["count"] <= 16 for info in meta["shards"].values())
    assert sum(info["count"] for info in meta["shards"].values()) == 105
    assert meta["noise"]["model"] == "none"  # own data: no noise unless asked


def test_manifest_csv_with_class_names_and_parquet_with_indices(image_folder, tmp_path):
    files = sorted(image_folder.rglob("*.png"))
    names = [p.parent.name for p in files]
    csv = image_folder / "labels.csv"
    csv.write_text(
        "path,label\n"
        + "".join(f"{p.relative_to(image_folder)},{n}\n" for p, n in zip(files, names, strict=True))
    )
    classes = ["normal", "benign", "malignant"]
    out = run(csv, tmp_path / "csv", classes=classes)
    got = {
        json.loads(s["json"])["source"]: json.loads(s["json"])["clean_label"]
        for s in read_shards(out).values()
    }
    assert got == {
        str(p.relative_to(image_folder)): classes.index(n)
        for p, n in zip(files, names, strict=True)
    }

    table = pa.table({"path": [str(p) for p in files], "label": [classes.index(n) for n in names]})
    pq.write_table(table, tmp_path / "labels.parquet")
    out2 = run(tmp_path / "labels.parquet", tmp_path / "pq", classes=classes)
    got2 = {
        json.loads(s["json"])["source"]: json.loads(s["json"])["clean_label"]
        for s in read_shards(out2).values()
    }
    assert got2 == {str(p): classes.index(n) for p, n in zip(files, names, strict=True)}


def test_npz_round_trip_pixels(tmp_path):
    rng = np.random.default_rng(0)
    parts = {}
    for part, n in (("train", 40), ("val", 10), ("test", 10)):
        parts[f"{part}_images"] = np.stack([make_image(1000 * len(part) + i, 28) for i in range(n)])
        parts[f"{part}_labels"] = rng.integers(0, 4, size=(n, 1))
    np.savez(tmp_path / "organmnist.npz", **parts)
    out = run(tmp_path / "organmnist.npz", tmp_path / "ds")
    samples = read_shards(out)
    assert len(samples) == 60
    for sample in samples.values():
        record = json.loads(sample["json"])
        part, row = record["source"].split(":")[1].split("_images[")
        row = int(row.rstrip("]"))
        decoded = np.asarray(Image.open(__import__("io").BytesIO(sample["png"])))
        np.testing.assert_array_equal(decoded, parts[f"{part}_images"][row])
        assert record["clean_label"] == parts[f"{part}_labels"][row, 0]


def test_embedded_default_is_br35h_with_40_percent_symmetric_noise(tmp_path):
    out = run(None, tmp_path / "br35h")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["no", "yes"]
    assert meta["noise"] == {
        "model": "symmetric",
        "rate": 0.4,
        "seed": 0,
        "map": None,
        "splits": ["train", "val"],
    }
    counts = {s: meta["splits"][s]["count"] for s in ("train", "val", "test")}
    assert sum(counts.values()) == 3000
    assert abs(meta["splits"]["train"]["noise_rate"] - 0.4) < 0.01
    assert meta["splits"]["test"]["noise_rate"] == 0
    assert abs(meta["splits"]["val"]["noise_rate"] - 0.4) < 0.01
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    split_of_group: dict[int, set] = {}
    for row in rows:
        split_of_group.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_group.values())
    assert meta["dedup"]["groups"] == len(split_of_group)


def test_near_duplicates_share_a_split_and_splits_are_disjoint(image_folder, tmp_path):
    out = run(image_folder, tmp_path / "ds", seed=3)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    by_source = {r["source"]: r for r in rows}
    for name in ("benign", "malignant", "normal"):
        for i in range(5):
            original, copy = by_source[f"{name}/{i:03d}.png"], by_source[f"{name}/{i:03d}_dup.png"]
            assert original["group"] == copy["group"]
            assert original["split"] == copy["split"]
    keys = {s: {r["key"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["dedup"]["groups"] == 90  # 105 images, 15 of them near copies
    assert meta["dedup"] == {
        "method": "phash256+mirror+windows16",
        "distance": 26,
        "search": "exact",
        "groups": 90,
    }
    for split, fraction in zip(("train", "val", "test"), (0.7, 0.1, 0.2), strict=True):
        per_class = meta["splits"][split]["per_class_clean"]
        assert all(abs(n - fraction * 35) <= 3 for n in per_class), (split, per_class)


def test_rerun_is_byte_identical_and_rewrite_needs_overwrite(image_folder, tmp_path):
    kw = {"noise": "symmetric", "noise_rate": 0.3, "seed": 7, "shard_size": 20}
    a, b = run(image_folder, tmp_path / "a", **kw), run(image_folder, tmp_path / "b", **kw)
    shards = sorted(p.name for p in a.glob("*.tar"))
    assert shards == sorted(p.name for p in b.glob("*.tar")) and len(shards) >= 5
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    with pytest.raises(DataError, match="differs in: noise_rate.*--overwrite"):
        run(image_folder, a, **{**kw, "noise_rate": 0.2})
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before  # nothing lost
    run(image_folder, a, **{**kw, "noise_rate": 0.2}, overwrite=True)
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["noise"]["rate"] == 0.2


def test_foreign_folder_is_never_overwritten(image_folder, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a dtrain dataset"):
        run(image_folder, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_shard_size_by_bytes(image_folder, tmp_path):
    out = run(image_folder, tmp_path / "ds", shard_bytes=20_000)
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["shards"]) > 3
    sizes = [info["bytes"] for info in meta["shards"].values()]
    assert max(sizes) <= 20_000 + 10240  # tar pads the last record to 10 KiB
    assert sorted(sizes)[-2] > 20_000 - 5000  # shards are filled, not cut early


def test_resize_re_encodes_shorter_side(image_folder, tmp_path):
    out = run(image_folder, tmp_path / "ds", resize=16)
    sample = next(iter(read_shards(out).values()))
    assert min(Image.open(__import__("io").BytesIO(sample["png"])).size) == 16


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda root: (root / "benign" / "002.png").write_bytes(b"not an image"),
            r"cannot decode image benign/002.png",
        ),
        (
            lambda root: (root / "benign" / "003.png").write_bytes(
                (root / "benign" / "003.png").read_bytes()[:60]
            ),
            r"cannot decode image benign/003.png",
        ),
        (lambda root: (root / "empty").mkdir(), r"class folder .*empty holds no images"),
    ],
)
def test_bad_folder_input_names_the_file(image_folder, tmp_path, damage, match):
    damage(image_folder)
    with pytest.raises(DataError, match=match):
        run(image_folder, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_skip_bad_images_leaves_them_out_and_records_them(image_folder, tmp_path):
    (image_folder / "benign" / "002.png").write_bytes(b"not an image")
    out = run(image_folder, tmp_path / "ds", skip_bad_images=True)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["images"]["skipped_unreadable"] == ["benign/002.png"]
    assert sum(s["count"] for s in meta["splits"].values()) == 104


def test_empty_source_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        run(tmp_path / "nothing", tmp_path / "ds")


@pytest.mark.parametrize(
    "rows, classes, match",
    [
        ("a.png,cat\n", ["benign", "malignant"], r"row 2: unknown class name 'cat'"),
        ("a.png,\n", None, r"row 2: missing label"),
        ("a.png,5\n", ["benign", "malignant"], r"row 0: label 5 is out of range"),
        ("missing.png,0\n", None, r"row 0: image .*missing.png does not exist"),
    ],
)
def test_bad_manifest_names_the_row(tmp_path, rows, classes, match):
    root = write_folder(tmp_path / "img", {"x": 1})
    (root / "a.png").write_bytes((root / "x" / "000.png").read_bytes())
    (root / "m.csv").write_text("path,label\n" + rows)
    with pytest.raises(DataError, match=match):
        run(root / "m.csv", tmp_path / "ds", classes=classes)


def test_manifest_without_label_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,diagnosis\na.png,0\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label', 'path'\]"):
        run(tmp_path / "m.csv", tmp_path / "ds")


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "prepare",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "ds"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "source" in result.stderr and "nope does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_dataset_json_needs_overwrite(image_folder, tmp_path):
    out = run(image_folder, tmp_path / "ds")
    (out / "dataset.json").write_text("{truncated")
    with pytest.raises(DataError, match=r"dataset.json cannot be read .*--overwrite"):
        run(image_folder, out)
    run(image_folder, out, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["classes"][0] == "benign"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"split": (0.5, 0.5, 0.1)}, "must sum to 1"),
        ({"split": (0.9, 0.1)}, "must be three fractions"),
        ({"dedup_distance": 257}, r"must lie in 0..256"),
        ({"shard_size": 0}, "at least 1"),
        ({"shard_bytes": 0}, "must be positive"),
        ({"resize": 4}, "at least 8 pixels"),
        ({"noise": "symmetric", "noise_rate": 0.9}, r"must lie in \[0, 0.667\)"),
    ],
)
def test_bad_requests_are_config_errors(image_folder, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        run(image_folder, tmp_path / "ds", **kw)
    assert not (tmp_path / "ds").exists()


def test_cli_refuses_a_noise_map_that_moves_nothing(image_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dtrain", "prepare", str(image_folder), "--out"]
        + [str(tmp_path / "ds"), "--noise", "asymmetric", "--noise-map", "0,1,2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "dtrain prepare: error: noise map [0, 1, 2] keeps every class (benign, malignant, "
        "normal): asymmetric noise needs at least one class whose labels move to another"
    ]
    assert not (tmp_path / "ds").exists()


# one command-line fragment per PrepareConfig field, each giving a value other than the default
CLI_ARGS = {
    "source": (["scans/"], "scans/"),
    "out": (["--out", "data/x"], "data/x"),
    "classes": (["--classes", "normal,benign,malignant"], ["normal", "benign", "malignant"]),
    "noise": (["--noise", "asymmetric"], "asymmetric"),
    "noise_rate": (["--noise-rate", "0.25"], 0.25),
    "noise_map": (["--noise-map", "2,0,1"], [2, 0, 1]),
    "noise_val": (["--clean-val"], False),
    "seed": (["--seed", "7"], 7),
    "split": (["--split", "0.8,0,0.2"], (0.8, 0.0, 0.2)),
    "group_column": (["--group-column", "patient_id"], "patient_id"),
    "clean_label_column": (["--clean-label-column", "clean"], "clean"),
    "dedup_distance": (["--dedup-distance", "6"], 6),
    "dedup_search": (["--dedup-search", "inverted"], "inverted"),
    "shard_size": (["--shard-size", "50"], 50),
    "shard_bytes": (["--shard-bytes", "500MB"], 500_000_000),
    "resize": (["--resize", "224"], 224),
    "workers": (["--workers", "4"], 4),
    "engine": (["--engine", "ray"], "ray"),
    "address": (["--address", "auto"], "auto"),
    "skip_bad_images": (["--skip-bad-images"], True),
    "overwrite": (["--overwrite"], True),
    "progress": (["--no-progress"], False),
}


def prepare_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `dtrain` parser with only `prepare`, and `prepare`'s own parser."""
    parser = argparse.ArgumentParser(prog="dtrain")
    sub = COMMAND.add_to(parser.add_subparsers(dest="command", required=True))
    return parser, sub


def parse(*argv: str) -> PrepareConfig:
    args = prepare_parser()[0].parse_args(["prepare", *argv])
    return PrepareConfig(**flag_values(args, PrepareConfig))


def test_cli_defaults_are_the_config_defaults():
    assert parse() == PrepareConfig()


def test_every_config_field_is_reachable_from_the_command_line():
    assert set(CLI_ARGS) == {f.name for f in fields(PrepareConfig)}
    default = PrepareConfig()
    for name, (argv, value) in CLI_ARGS.items():
        config = parse(*argv)
        changed = [
            f.name for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)
        ]
        assert changed == [name], argv
        assert getattr(config, name) == value


def test_full_command_line_gives_the_expected_config():
    argv = [a for fragment, _ in CLI_ARGS.values() for a in fragment]
    assert parse(*argv) == PrepareConfig(**{name: value for name, (_, value) in CLI_ARGS.items()})
    assert parse(*argv[1:], "--split=1,0,0", "s").split == (1.0, 0.0, 0.0)  # any order
    assert parse("--shard-bytes", "2GiB").shard_bytes == 2 * 2**30
    with pytest.raises(SystemExit):
        parse("--noise", "gaussian")  # choices come from the Literal


def test_help_shows_every_option_with_its_default():
    text = " ".join(prepare_parser()[1].format_help().split())
    for option in [a[0] for a, _ in CLI_ARGS.values() if a[0].startswith("--")]:
        assert option in text
    assert text.count("(default: ") == len(CLI_ARGS)
    for shown in ("(default: 0.7,0.1,0.2)", "(default: 26 up to 30,000 images", "(default: 1000)"):
        assert shown in text
    assert "{none,symmetric,asymmetric,instance}" in text

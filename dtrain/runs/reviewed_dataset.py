"""`dtrain relabel`: the corrections a person wrote into a review (`dtrain review`'s review.csv:
key, corrected_label) become a new dataset version beside the old one, which is only read.

A corrected row's class becomes its training label (`.cls` and the record's noisy_label); its
clean_label stays, so that with injected noise the gain can still be measured against the truth.
A row marked `drop` leaves the dataset; an empty one keeps its label. Only the shards that hold a
changed or dropped sample are rewritten (image bytes as they were, tar bytes a function of the
samples as `dtrain prepare` writes them); the others are hard links to the old files."""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtrain.errors import DataError
from dtrain.prepare.folder import holds_request, new_staging, publish
from dtrain.prepare.records import DATASET_JSON, MANIFEST, split_stats, write_description
from dtrain.prepare.shard_writer import sha256
from dtrain.prepare.split import SPLITS

if TYPE_CHECKING:
    import pyarrow as pa

KEY_COLUMN = "key"
CORRECTION_COLUMN = "corrected_label"
DROP = "drop"
AUDIT_CSV = "relabel.csv"


@dataclass(frozen=True)
class Correction:
    """One reviewed row with a decision: its new label index, or None to drop the sample."""

    key: str
    line: int
    label: int | None


def resolve_label(value: str, classes: list[str]) -> int | None:
    """A corrected_label cell -> a class index, or None for `drop`. A class name wins (then the
    same name in other letter case, where only one class matches), then `drop`, then an index;
    anything else raises ValueError."""
    if value in classes:
        return classes.index(value)
    folded = [i for i, name in enumerate(classes) if name.casefold() == value.casefold()]
    if len(folded) == 1:
        return folded[0]
    if value.casefold() == DROP:
        return None
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise ValueError(value)


def read_corrections(
    csv_path: Path, classes: list[str], known: pa.ChunkedArray
) -> dict[str, Correction]:
    """The decisions of a filled review.csv, by key; every row checked before anything is
    written. Rows with an empty corrected_label keep their label (their key must still be one of
    `known`, the manifest's keys: a review of another dataset is refused, not half applied)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # Excel adds a BOM
            header = handle.readline()
            handle.seek(0)
            # a spreadsheet set to a comma-decimal locale saves with semicolons
            delimiter = ";" if ";" in header and "," not in header else ","
            reader = csv.DictReader(handle, delimiter=delimiter)
            return _corrections(reader, csv_path, classes, known)
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path} is not UTF-8 text ({err}); save it as CSV UTF-8") from err
    except csv.Error as err:
        raise DataError(f"{csv_path} is not a readable CSV file ({err})") from err
    except OSError as err:
        raise DataError(f"cannot read review {csv_path}: {err}") from err


def _corrections(
    reader: csv.DictReader, csv_path: Path, classes: list[str], known: pa.ChunkedArray
) -> dict[str, Correction]:
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = reader.fieldnames or []
    for needed in (KEY_COLUMN, CORRECTION_COLUMN):
        if needed not in columns:
            raise DataError(
                f"{csv_path} has no {needed!r} column (its columns: {', '.join(columns) or 'none'})"
                f"; a review needs {KEY_COLUMN} and {CORRECTION_COLUMN}, as dtrain review writes"
            )
    rows = [
        ((row[KEY_COLUMN] or "").strip(), (row[CORRECTION_COLUMN] or "").strip(), reader.line_num)
        for row in reader
    ]
    # one look-up of all the review's keys among the manifest's (a million keys as a Python
    # set would take longer than the review and a hundred megabytes)
    listed = pc.is_in(pa.array([key for key, _, _ in rows], pa.string()), value_set=known)
    found: dict[str, Correction] = {}
    for (key, value, line), is_known in zip(rows, listed.to_pylist(), strict=True):
        where = f"{csv_path} line {line}"
        if not key:
            if value:
                raise DataError(f"{where}: corrected_label {value!r} but no key")
            continue  # a blank line
        if not is_known:
            raise DataError(
                f"{where}: key {key!r} is not in the dataset; is this the review of another "
                "dataset?"
            )
        if not value:
            continue
        try:
            label = resolve_label(value, classes)
        except ValueError:
            raise DataError(
                f"{where} (key {key}): corrected_label {value!r} is not a class; write one of "
                f"{', '.join(classes)} (or its index), {DROP} to remove the sample, or nothing "
                "to keep its label"
            ) from None
        earlier = found.get(key)
        if earlier is not None and earlier.label != label:
            raise DataError(
                f"{where}: key {key} was already corrected differently on line {earlier.line}; "
                "keep one decision per key"
            )
        found[key] = Correction(key, line, label)
    return found


def _relabelled(members: dict[str, bytes], label: int) -> dict[str, bytes]:
    """A sample with training label `label`: its `.cls` and its record's noisy_label."""
    members = {**members, "cls": str(label).encode()}
    if "json" in members:
        record = json.loads(members["json"])
        record["noisy_label"] = label
        members["json"] = json.dumps(record, sort_keys=True).encode()  # as prepare writes it
    return members


def rewrite_shard(
    source: Path, target: Path, labels: dict[str, int], drop: set[str], info: dict
) -> tuple[int, set[str]]:
    """Copy shard `source` to `target` with the new `labels` and without the `drop` keys; returns
    the samples written and the keys read. Read as the loader reads it (one pass, its count and
    sha256 checked against `info`, unsafe member names refused): a shard that changed since it
    was written fails the relabel, whose staging folder is then removed."""
    import webdataset as wds

    from dtrain.dataset.shard_reader import read_shard

    count, seen = 0, set()
    with wds.TarWriter(str(target), mtime=0) as writer:
        for sample in read_shard(str(source), info["count"], info["sha256"], strict=True):
            if sample.problem:
                raise DataError(sample.problem)
            seen.add(sample.key)
            if sample.key in drop:
                continue
            members = sample.members
            if sample.key in labels:
                members = _relabelled(members, labels[sample.key])
            writer.write({"__key__": sample.key, **members})
            count += 1
    return count, seen


def _new_manifest(table: pa.Table, changed: dict[str, int], dropped: set[str]) -> pa.Table:
    """The manifest with the new noisy labels, `original_label` (the label before the first
    relabel), is_noisy against clean_label and the dropped rows removed; other columns kept.
    Column operations only: its cost is that of the columns, whatever the few changes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys, old = table.column("key"), table.column("noisy_label")
    at = pc.index_in(keys, value_set=pa.array(list(changed), pa.string()))
    new = pc.coalesce(pa.array(list(changed.values()), old.type).take(at), old)
    if "original_label" not in table.column_names:
        table = table.append_column("original_label", old)
    names = table.column_names
    table = table.set_column(names.index("noisy_label"), "noisy_label", new)
    is_noisy = pc.not_equal(table.column("clean_label"), new)
    table = table.set_column(names.index("is_noisy"), "is_noisy", is_noisy)
    gone = pc.is_in(keys, value_set=pa.array(list(dropped), pa.string()))
    return table.filter(pc.invert(gone))


def _split_description(table: pa.Table, old: dict, num_classes: int, review_csv: Path) -> dict:
    """dataset.json's per-split stats recomputed from the new manifest (other entries kept)."""
    import pyarrow.compute as pc

    out = {}
    for name in old:
        members = table.filter(pc.equal(table.column("split"), name))
        clean, noisy, group = (
            members.column(c).to_numpy().astype(np.int64)
            for c in ("clean_label", "noisy_label", "group")
        )
        stats = split_stats(clean, noisy, group, num_classes)
        out[name] = {**old[name], **stats}
        if old[name]["count"] and not out[name]["count"]:
            raise DataError(f"{review_csv} drops every {name} sample; keep some")
    return out


def _write_audit(
    path: Path, rows: list[dict], changed: dict[str, int], dropped: set[str], classes: list[str]
) -> None:
    """relabel.csv: key, split, old and new class (or drop) of each change, in manifest order."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["key", "split", "old", "new"])
        for r in rows:
            if r["key"] in dropped or r["key"] in changed:
                new = DROP if r["key"] in dropped else classes[changed[r["key"]]]
                writer.writerow([r["key"], r["split"], classes[r["noisy_label"]], new])


def _read_dataset(folder: Path) -> tuple[dict, pa.Table]:
    import pyarrow.parquet as pq

    if not (folder / DATASET_JSON).is_file() or not (folder / MANIFEST).is_file():
        raise DataError(
            f"{folder} holds no {DATASET_JSON} and {MANIFEST}: not a folder `dtrain prepare` wrote"
        )
    meta = json.loads((folder / DATASET_JSON).read_text())
    for name, info in meta["shards"].items():
        if "url" in info:
            raise DataError(
                f"{folder} lists shards that lie elsewhere ({info['url']}; `dtrain index`): "
                "relabel rewrites shards, so correct the labels where those shards are made "
                "and index them again"
            )
        if Path(name).name != name or name.startswith("."):
            raise DataError(f"{folder / DATASET_JSON}: shard name {name!r} is not a file name")
    return meta, pq.read_table(folder / MANIFEST)


def _link(source: Path, target: Path) -> None:
    """`target` a hard link to `source` (a copy where links are not possible). Straight into
    the private staging folder, which is published whole: no temporary name and no fsync per
    shard (a thousand directory syncs take seconds to minutes on a network file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_shards(
    dataset: Path,
    staging: Path,
    recorded: dict[str, dict],
    edits_in: dict[str, set[str]],
    changed: dict[str, int],
    dropped: set[str],
    progress: bool,
) -> dict[str, dict]:
    """Every shard of `dataset` into `staging`: rewritten where `edits_in` names it, else a hard
    link; returns dataset.json's new `shards`."""
    from tqdm.auto import tqdm

    shards = {}
    shown = None if progress else True  # tqdm: None hides the bar where stderr is no terminal
    for name in tqdm(sorted(recorded), desc="relabel", unit="shard", disable=shown):
        info = dict(recorded[name])
        if name not in edits_in:
            if (dataset / name).stat().st_size != info["bytes"]:
                raise DataError(f"shard {dataset / name} changed since dtrain prepare wrote it")
            _link(dataset / name, staging / name)
        else:
            count, seen = rewrite_shard(dataset / name, staging / name, changed, dropped, info)
            if missing := sorted(edits_in[name] - seen):
                raise DataError(
                    f"{dataset / MANIFEST} puts {missing[0]} in shard {name}, which does not hold "
                    "it; re-create that dataset"
                )
            size, digest = (staging / name).stat().st_size, sha256(staging / name)
            info.update(count=count, bytes=size, sha256=digest)
        shards[name] = info
    return shards


def relabel(
    dataset: str | Path,
    review_csv: str | Path,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the new version of `dataset` that the filled `review_csv` asks for to `out` (built
    in a hidden sibling folder and moved into place at the end) and return `out`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    dataset, review_csv, out = Path(dataset), Path(review_csv), Path(out)
    meta, manifest = _read_dataset(dataset)
    if out.resolve().is_relative_to(dataset.resolve()):
        raise DataError(
            f"--out {out} is inside the dataset {dataset}; a relabelled version needs a folder "
            "of its own"
        )
    classes = meta["classes"]
    keys = manifest.column("key")
    corrections = read_corrections(review_csv, classes, keys)
    # of the manifest, only the rows the review decided on become Python values
    decided = pc.is_in(keys, value_set=pa.array(list(corrections), pa.string()))
    rows = manifest.select(["key", "split", "shard", "noisy_label"]).filter(decided).to_pylist()
    by_key = {r["key"]: r for r in rows}
    dropped = {k for k, c in corrections.items() if c.label is None}
    changed = {
        k: c.label
        for k, c in corrections.items()
        if c.label is not None and c.label != by_key[k]["noisy_label"]
    }
    request = {
        **meta["request"],
        "relabel": {"from": str(dataset.resolve()), "review_sha256": sha256(review_csv)},
    }
    if holds_request(out, request, overwrite):
        print(f"{out} already holds this relabelled dataset; nothing to do")
        return out
    new_table = _new_manifest(manifest, changed, dropped)
    splits = _split_description(new_table, meta["splits"], len(classes), review_csv)

    edits_in: dict[str, set[str]] = {}  # shard -> the keys it holds that change or go
    for key in (*changed, *dropped):
        edits_in.setdefault(by_key[key]["shard"], set()).add(key)
    staging = new_staging(out)
    try:
        shards = _write_shards(
            dataset, staging, meta["shards"], edits_in, changed, dropped, progress
        )
        pq.write_table(new_table, staging / MANIFEST)
        _write_audit(staging / AUDIT_CSV, rows, changed, dropped, classes)
        meta = {
            **meta,
            "shards": shards,
            "splits": splits,
            "request": request,
            "relabel": {
                "from": str(dataset.resolve()),
                "review": str(review_csv.resolve()),
                "review_sha256": request["relabel"]["review_sha256"],
                "changed": len(changed),
                "dropped": len(dropped),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        write_description(staging, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
    print(
        f"wrote {out}: {len(changed)} label(s) changed, {len(dropped)} sample(s) dropped; "
        f"{len(edits_in)} of {len(shards)} shards rewritten, the others hard-linked; "
        f"audit: {out / AUDIT_CSV}"
    )
    for name in SPLITS:
        if name in splits and splits[name]["count"]:
            print(
                f"  {name:5s} {splits[name]['count']:6d} images, noise rate now "
                f"{splits[name]['noise_rate']:.3f} (against clean_label)"
            )
    return out

"""What a dataset says about itself besides the shards: `manifest.parquet` (one row per sample),
`dataset.json` (classes, counts, how it was split, the noise as requested and as realised, shard
checksums, the request) and the summary printed at the end, so that every robustness claim can be
checked. A manifest's own columns (patient, age, scanner...) stay beside dtrain's, for the user's
own analyses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtrain.errors import DataError
from dtrain.prepare.dedup import HASH_BITS, WINDOWS, resolved_search
from dtrain.prepare.noise import transition_matrix
from dtrain.prepare.prepare_config import FORMAT_VERSION, PrepareConfig
from dtrain.prepare.shard_writer import Rows, key_of
from dtrain.prepare.sources import SPLIT_COLUMN, Source
from dtrain.prepare.split import SPLITS

if TYPE_CHECKING:
    import pyarrow as pa

DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
# one row per sample, in shard order
MANIFEST_COLUMNS = (
    "key",
    "shard",
    "split",
    "clean_label",
    "noisy_label",
    "is_noisy",
    "group",
    "source",
)
RENAMED_PREFIX = "source_"


def kept_columns(source: Source) -> pa.Table | None:
    """The source manifest's own columns as `manifest.parquet` keeps them: under their names, or
    as `source_<name>` where the name is one of dtrain's columns."""
    if source.columns is None:
        return None
    names = source.columns.column_names
    kept = [f"{RENAMED_PREFIX}{c}" if c in MANIFEST_COLUMNS else c for c in names]
    clash = sorted({c for c in kept if kept.count(c) > 1})
    if clash:
        original = clash[0].removeprefix(RENAMED_PREFIX)
        raise DataError(
            f"manifest {source.description['manifest']} has columns {original} and {clash[0]}; "
            f"dtrain keeps its {original} column as {clash[0]}, so rename one of them"
        )
    return source.columns.rename_columns(kept)


def manifest_columns(rows: Rows, shard_of_row: list[str], source: Source) -> dict[str, list]:
    """dtrain's manifest columns of prepared rows, built column by column (a million rows as
    Python dicts would take gigabytes)."""
    return {
        "key": [key_of(i) for i in rows.index.tolist()],
        "shard": shard_of_row,
        "split": np.asarray(SPLITS)[rows.split].tolist(),
        "clean_label": rows.clean.tolist(),
        "noisy_label": rows.noisy.tolist(),
        "is_noisy": (rows.clean != rows.noisy).tolist(),
        "group": rows.group.tolist(),
        "source": [source.paths[i] for i in rows.index.tolist()],
    }


def write_manifest(
    folder: Path,
    columns: dict[str, list],
    own: pa.Table | None = None,
    own_rows: np.ndarray | None = None,
) -> None:
    """dtrain's columns (`MANIFEST_COLUMNS`), then rows `own_rows` of the source manifest's own
    (`kept_columns`), one row per sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: columns[c] for c in MANIFEST_COLUMNS})
    if own is not None:
        own = own.take(pa.array(own_rows, pa.int64()))
        for name, column in zip(own.column_names, own.columns, strict=True):
            table = table.append_column(name, column)
    pq.write_table(table, folder / MANIFEST)


def split_stats(clean: np.ndarray, noisy: np.ndarray, groups: np.ndarray, num_classes: int) -> dict:
    """One split's entry in `dataset.json`: counts per class and the realised label noise."""
    return {
        "count": len(clean),
        "groups": int(len(np.unique(groups))),
        "per_class_clean": np.bincount(clean, minlength=num_classes).tolist(),
        "per_class_noisy": np.bincount(noisy, minlength=num_classes).tolist(),
        "noise_rate": float((clean != noisy).mean()) if len(clean) else 0.0,
        "transition_matrix": transition_matrix(clean, noisy, num_classes).round(6).tolist(),
    }


def noise_record(config: PrepareConfig, model: str, rate: float, per_split: dict) -> dict:
    """The noise as requested, or, for a manifest that ships clean labels beside its noisy
    ones (`--clean-label-column`), as found: model `manifest`, its train split's measured rate
    (what a nominal rate stands for elsewhere), in every split the shipped labels reach."""
    if config.clean_label_column is None:
        return {
            "model": model,
            "rate": rate,
            "seed": config.seed,
            "map": config.noise_map,
            "splits": config.noised_splits(),
        }
    return {
        "model": "manifest",
        "column": config.clean_label_column,
        "rate": per_split["train"]["noise_rate"],
        "splits": [s for s in SPLITS if s != "val" or config.noise_val],
    }


def describe(
    source: Source,
    config: PrepareConfig,
    request: dict,
    clean: np.ndarray,
    noisy: np.ndarray,
    groups: np.ndarray,
    split_of: np.ndarray,
    image_stats: dict,
    shards: dict[str, dict],
    near_duplicate_groups: int,
    kept: list[str],
) -> dict:
    """The contents of `dataset.json`. `groups` are the units of splitting (near-duplicates
    joined with the source's patients or studies); `kept` the source's own manifest columns."""
    noise_model, noise_rate = config.resolved_noise()
    fractions = config.split_fractions(source)
    per_split = {}
    for s, split in enumerate(SPLITS):
        members = split_of == s
        per_split[split] = split_stats(
            clean[members], noisy[members], groups[members], len(source.classes)
        )
    return {
        "format_version": FORMAT_VERSION,
        "name": source.name,
        "classes": source.classes,
        "source": {"kind": source.kind, **source.description},
        "images": image_stats,
        "dedup": {
            "method": f"phash{HASH_BITS}+mirror+windows{WINDOWS}",
            "distance": config.distance(len(source)),
            "search": resolved_search(config.dedup_search, len(source)),
            "groups": near_duplicate_groups,
        },
        "split_by": {
            "fractions": None if fractions is None else list(fractions),
            "column": None if fractions is not None else SPLIT_COLUMN,
            "group_column": source.group_column,
            "groups": int(groups.max() + 1),
        },
        "manifest_columns": kept,
        "noise": noise_record(config, noise_model, noise_rate, per_split),
        "splits": per_split,
        "shard_pattern": {
            split: f"{split}-{{000000..{max(0, n - 1):06d}}}.tar"
            for split in SPLITS
            if (n := sum(1 for i in shards.values() if i["split"] == split))
        },
        "shards": shards,
        "request": request,
    }


def write_description(folder: Path, meta: dict) -> None:
    (folder / DATASET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def print_summary(out: Path, meta: dict) -> None:
    """Counts per split, the manifest columns kept and, with noise, the realised transition
    matrix of the first noised split that holds images."""
    classes = meta["classes"]
    print(f"wrote {out}: {len(meta['shards'])} shards")
    for split, info in meta["splits"].items():
        if not info["count"]:
            print(f"  {split:5s}      0 images")
            continue
        print(
            f"  {split:5s} {info['count']:6d} images in {info['groups']:5d} groups, "
            f"noise rate {info['noise_rate']:.3f}"
        )
    if meta.get("manifest_columns"):
        print(f"  {MANIFEST} also keeps the manifest's {', '.join(meta['manifest_columns'])}")
    if meta["noise"]["model"] == "none":
        return
    noised = [s for s in meta["noise"]["splits"] if meta["splits"][s]["count"]]
    if not noised:
        print(f"  no noise added: no images in {' or '.join(meta['noise']['splits'])}")
        return
    print(f"  {noised[0]} transition matrix P(noisy | clean), rows clean, columns noisy:")
    width = max(7, max(len(c) for c in classes) + 2)
    print(" " * (width + 2) + "".join(f"{c:>{width}s}" for c in classes))
    for c, row in zip(classes, meta["splits"][noised[0]]["transition_matrix"], strict=False):
        print(f"  {c:>{width}s}" + "".join(f"{v:>{width}.3f}" for v in row))

"""What a dataset says about itself besides the shards: `manifest.parquet` (one row per sample),
`dataset.json` (classes, counts, the noise as requested and as realised, shard checksums, the
request) and the summary printed at the end, so that every robustness claim can be checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dtrain.prepare.config import FORMAT_VERSION, PrepareConfig
from dtrain.prepare.noise import transition_matrix
from dtrain.prepare.sources import Source
from dtrain.prepare.split import SPLITS

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


def write_manifest(folder: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r[c] for r in rows] for c in MANIFEST_COLUMNS})
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
) -> dict:
    """The contents of `dataset.json`."""
    noise_model, noise_rate = config.resolved_noise()
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
        "dedup": {"threshold": config.dedup_threshold, "groups": int(groups.max() + 1)},
        "noise": {
            "model": noise_model,
            "rate": noise_rate,
            "seed": config.seed,
            "map": config.noise_map,
            "splits": config.noised_splits(),
        },
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
    """Counts per split and, with noise, train's realised transition matrix."""
    classes = meta["classes"]
    print(f"wrote {out}: {len(meta['shards'])} shards")
    for split, info in meta["splits"].items():
        if not info["count"]:
            continue
        print(
            f"  {split:5s} {info['count']:6d} images in {info['groups']:5d} groups, "
            f"noise rate {info['noise_rate']:.3f}"
        )
    train = meta["splits"]["train"]
    if meta["noise"]["model"] != "none":
        print("  train transition matrix P(noisy | clean), rows clean, columns noisy:")
        width = max(7, max(len(c) for c in classes) + 2)
        print(" " * (width + 2) + "".join(f"{c:>{width}s}" for c in classes))
        for c, row in zip(classes, train["transition_matrix"], strict=False):
            print(f"  {c:>{width}s}" + "".join(f"{v:>{width}.3f}" for v in row))

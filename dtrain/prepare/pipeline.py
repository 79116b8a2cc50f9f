"""`prepare`: read the source, group near-duplicates (joined with the source's patients or
studies), split by group or as the source's split column says, add label noise to train (and
val), write the shards and their records. Every random choice is seeded from the request, so a
rerun writes byte-identical shards."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

from dtrain.errors import ConfigError, DataError
from dtrain.prepare.dedup import BadImageError, decode_thumbnail, near_duplicate_groups
from dtrain.prepare.folder import holds_request, new_staging, publish
from dtrain.prepare.noise import apply_noise, check_noise
from dtrain.prepare.prepare_config import PrepareConfig, default_out
from dtrain.prepare.records import (
    describe,
    kept_columns,
    print_summary,
    write_description,
    write_manifest,
)
from dtrain.prepare.shard_writer import sha256, write_shards
from dtrain.prepare.sources import SPLIT_COLUMN, Source, open_source
from dtrain.prepare.split import (
    SPLITS,
    join_groups,
    pairs_across_splits,
    stratified_group_split,
)

T = TypeVar("T")
SPLIT_TOLERANCE = 0.02  # how far a realised split fraction may miss the asked one unsaid


def _progress(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def _scan(source: Source, config: PrepareConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Thumbnails of every readable item, the indices kept, and image statistics."""
    thumbs, kept, skipped = [], [], []
    gray, sizes = 0, []
    for i in _progress(range(len(source)), len(source), "reading", config.progress):
        data, _ = source.read(i)
        try:
            thumb, is_gray, size = decode_thumbnail(data)
        except BadImageError as err:
            if not config.skip_bad_images:
                raise DataError(
                    f"cannot decode image {source.paths[i]} ({err}); fix or remove the file, or "
                    "pass --skip-bad-images to leave it out"
                ) from err
            skipped.append(source.paths[i])
            continue
        thumbs.append(thumb)
        kept.append(i)
        gray += is_gray
        sizes.append(size)
    if not kept:
        raise DataError(f"source {source.name} has no readable images")
    sizes_arr = np.asarray(sizes)
    stats = {
        "channels": 1 if gray >= 0.95 * len(kept) else 3,
        "grayscale_fraction": round(gray / len(kept), 4),
        "min_size": sizes_arr.min(axis=0).tolist(),
        "max_size": sizes_arr.max(axis=0).tolist(),
        "skipped_unreadable": skipped,
    }
    return np.stack(thumbs), np.asarray(kept), stats


def _split(
    source: Source, config: PrepareConfig, kept: np.ndarray, clean: np.ndarray, thumbs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """The unit-of-splitting group and the split index of each kept item, and the number of
    near-duplicate groups. With a split column the user's splits stand; near-duplicates across
    them are only reported (a patient across them was refused when the manifest was read)."""
    duplicates = near_duplicate_groups(thumbs, config.dedup_threshold)
    num_duplicates = int(duplicates.max() + 1)
    print(
        f"{source.name}: {len(kept)} images, {num_duplicates} near-duplicate groups "
        f"(correlation > {config.dedup_threshold} on {thumbs.shape[1]}px thumbnails)"
    )
    groups = duplicates
    if source.group_of is not None:
        groups = join_groups(duplicates, source.group_of[kept])
        print(
            f"  {len(np.unique(source.group_of[kept]))} {source.group_column} values; joined "
            f"with the near-duplicates, {groups.max() + 1} groups"
        )
    fractions = config.split_fractions(source)
    if fractions is not None:
        split_of = stratified_group_split(clean, groups, fractions, config.seed)
        _check_fractions(split_of, groups, fractions, config, source)
        return groups, split_of, num_duplicates
    split_of = source.split_of[kept]
    crossing = pairs_across_splits(duplicates, split_of)
    if crossing:
        print(
            f"warning: {crossing} near-duplicate image pairs lie in different splits of the "
            f"{SPLIT_COLUMN} column; they stay there, but copies of one scan in train and test "
            "make the test score optimistic"
        )
    return groups, split_of, num_duplicates


def _check_fractions(
    split_of: np.ndarray,
    groups: np.ndarray,
    fractions: tuple[float, float, float],
    config: PrepareConfig,
    source: Source,
) -> None:
    """A split asked for but left empty by groups too large to cut is refused, saying what to
    change; fractions missed by more than SPLIT_TOLERANCE are said in one line."""
    n = len(split_of)
    counts = np.bincount(split_of, minlength=len(SPLITS))
    largest = int(np.bincount(groups).max())
    why = (
        f"the largest group holds {largest} of {n} images ({largest / n:.0%}): near-duplicates "
        f"(thumbnail correlation > {config.dedup_threshold})"
        + (f" joined with {source.group_column}" if source.group_of is not None else "")
        + " chain images into groups that a split cannot cut"
    )
    for s, name in enumerate(SPLITS):
        if fractions[s] * n >= 1 and counts[s] == 0:
            raise DataError(
                f"splitting {source.name} by group left {name} empty ({fractions[s]:g} of the "
                f"images asked): {why}; raise --dedup-threshold (e.g. 0.99) or check "
                "--group-column"
            )
    got = counts / n
    if np.abs(got - np.asarray(fractions)).max() > SPLIT_TOLERANCE:
        print(
            f"warning: split {','.join(f'{f:.2f}' for f in got)} where "
            f"{','.join(f'{f:g}' for f in fractions)} was asked (beyond ±{SPLIT_TOLERANCE:g}): "
            f"{why}"
        )


def prepare(config: PrepareConfig) -> Path:
    """Build the dataset `config` asks for and return its folder."""
    config.validate()
    source = open_source(
        config.source, config.classes, config.group_column, config.clean_label_column
    )
    columns = kept_columns(source)
    noise_model, noise_rate = config.resolved_noise()
    check_noise(noise_model, noise_rate, len(source.classes), config.noise_map, source.classes)
    if source.clean_labels is not None and noise_model != "none":
        raise ConfigError(
            f"--noise {noise_model} with --clean-label-column {config.clean_label_column}: the "
            "manifest's `label` column already holds its noisy labels; drop --noise"
        )
    out = Path(config.out) if config.out else default_out(config, source)
    request = config.request(source)
    if holds_request(out, request, config.overwrite):
        print(f"{out} already holds this dataset; nothing to do")
        return out

    thumbs, kept, image_stats = _scan(source, config)
    shipped = source.labels[kept]  # the labels a user has: what the split is stratified by
    groups, split_of, num_duplicates = _split(source, config, kept, shipped, thumbs)
    if source.clean_labels is not None:  # a benchmark set that ships both labels
        clean, noisy = source.clean_labels[kept], shipped.copy()
        if not config.noise_val:  # --clean-val: val's labels are the clean ones
            noisy[split_of == SPLITS.index("val")] = clean[split_of == SPLITS.index("val")]
    else:
        clean, noisy = shipped, shipped.copy()
    for s, name in enumerate(SPLITS):
        if source.clean_labels is None and name in config.noised_splits():
            members = np.flatnonzero(split_of == s)
            noisy[members] = apply_noise(
                clean[members],
                len(source.classes),
                noise_model,
                noise_rate,
                seed=config.seed + 1000 * (s + 1),
                mapping=config.noise_map,
                features=thumbs[members],
            )

    rng = np.random.default_rng(config.seed)
    staging = new_staging(out)
    rows_all: list[dict] = []
    shards: dict[str, dict] = {}
    for s, split in enumerate(SPLITS):
        members = np.flatnonzero(split_of == s)
        members = members[rng.permutation(len(members))]  # mix classes and groups in each shard
        rows = [
            {
                "key": f"s{kept[m]:07d}",
                "index": int(kept[m]),
                "split": split,
                "clean_label": int(clean[m]),
                "noisy_label": int(noisy[m]),
                "is_noisy": bool(clean[m] != noisy[m]),
                "group": int(groups[m]),
                "source": source.paths[kept[m]],
            }
            for m in members
        ]
        shards.update(
            write_shards(
                staging,
                source,
                _progress(rows, len(rows), f"writing {split}", config.progress),
                split,
                shard_size=config.shard_size,
                shard_bytes=config.shard_bytes,
                resize=config.resize,
            )
        )
        rows_all += rows
    for name, info in shards.items():
        info["bytes"] = (staging / name).stat().st_size
        info["sha256"] = sha256(staging / name)

    write_manifest(staging, rows_all, columns)
    meta = describe(
        source,
        config,
        request,
        clean,
        noisy,
        groups,
        split_of,
        image_stats,
        shards,
        near_duplicate_groups=num_duplicates,
        kept=[] if columns is None else columns.column_names,
    )
    write_description(staging, meta)
    publish(staging, out)
    print_summary(out, meta)
    return out

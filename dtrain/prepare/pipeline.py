"""`prepare`: read the source, group near-duplicates (joined with the source's patients or
studies), split by group or as the source's split column says, add label noise to train (and
val), write the shards and their records. Every random choice is seeded from the request, so a
rerun writes byte-identical shards."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

from dtrain.errors import ConfigError, DataError
from dtrain.prepare.dedup import near_duplicate_groups, resolved_search
from dtrain.prepare.engines import default_workers, run_tasks
from dtrain.prepare.fingerprints import Scan, scan_images
from dtrain.prepare.folder import holds_request, new_staging, publish
from dtrain.prepare.noise import apply_noise, check_noise
from dtrain.prepare.prepare_config import PrepareConfig, default_out
from dtrain.prepare.records import (
    describe,
    kept_columns,
    manifest_columns,
    print_summary,
    write_description,
    write_manifest,
)
from dtrain.prepare.shard_writer import (
    Rows,
    ShardJob,
    plan_shards,
    sample_bytes,
    write_shard,
)
from dtrain.prepare.sources import SPLIT_COLUMN, Source, open_source
from dtrain.prepare.split import (
    SPLITS,
    join_groups,
    pairs_across_splits,
    stratified_group_split,
)

T = TypeVar("T")
IMAGES_PER_WORKER = 2000  # fewer per default worker, and starting it costs more than it saves
SPLIT_TOLERANCE = 0.02  # how far a realised split fraction may miss the asked one unsaid


def _split(
    source: Source, config: PrepareConfig, scan: Scan, clean: np.ndarray, run: Callable
) -> tuple[np.ndarray, np.ndarray, int]:
    """The unit-of-splitting group and the split index of each kept item, and the number of
    near-duplicate groups. With a split column the user's splits stand; near-duplicates across
    them are only reported (a patient across them was refused when the manifest was read)."""
    kept = scan.kept
    distance = config.distance(len(source))
    duplicates = near_duplicate_groups(
        scan.hashes,
        scan.mirrors,
        scan.constant,
        scan.values,
        distance,
        run,
        resolved_search(config.dedup_search, len(source)),
        windows=scan.windows,
    )
    num_duplicates = int(duplicates.max() + 1)
    print(
        f"{source.name}: {len(kept)} images, {num_duplicates} near-duplicate groups "
        f"(perceptual hashes within {distance} bits)"
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
        f"(perceptual hashes within {config.distance(len(source))} bits)"
        + (f" joined with {source.group_column}" if source.group_of is not None else "")
        + " chain images into groups that a split cannot cut"
    )
    for s, name in enumerate(SPLITS):
        if fractions[s] * n >= 1 and counts[s] == 0:
            raise DataError(
                f"splitting {source.name} by group left {name} empty ({fractions[s]:g} of the "
                f"images asked): {why}; lower --dedup-distance (e.g. 6) or check "
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

    # by default a worker per core (the cluster's with --address), but not for a small set: a
    # worker takes a second to start
    workers = config.workers or min(
        default_workers(config.engine, config.address),
        max(1, len(source) // IMAGES_PER_WORKER),
    )
    engine = {"engine": config.engine, "workers": workers, "address": config.address}
    scan = scan_images(
        source,
        thumbs=noise_model == "instance",
        payload_resize=None if config.shard_bytes is None else config.resize or 0,
        skip_bad_images=config.skip_bad_images,
        progress=config.progress,
        **engine,
    )
    kept = scan.kept
    shipped = source.labels[kept]  # the labels a user has: what the split is stratified by
    groups, split_of, num_duplicates = _split(
        source, config, scan, shipped, functools.partial(run_tasks, **engine)
    )
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
                features=None if scan.thumbs is None else scan.thumbs[members],
            )

    # shard order: per split, a seeded shuffle that mixes classes and groups in each shard
    rng = np.random.default_rng(config.seed)
    order = np.concatenate(
        [
            members[rng.permutation(len(members))]
            for members in (np.flatnonzero(split_of == s) for s in range(len(SPLITS)))
        ]
    )
    rows = Rows(kept[order], split_of[order], clean[order], noisy[order], groups[order])
    specs = []
    for s, split in enumerate(SPLITS):
        start, stop = np.searchsorted(rows.split, [s, s + 1])
        sizes = np.zeros(stop - start, np.int64)
        if config.shard_bytes is not None:
            sizes = sample_bytes(rows, start, stop, scan.payload[order[start:stop]], source)
        specs += plan_shards(split, int(start), sizes, config.shard_size, config.shard_bytes)

    staging = new_staging(out)
    job = ShardJob(_worker_source(source), rows, str(staging), config.resize)
    shards: dict[str, dict] = {}
    shard_of_row: list[str] = []
    results = run_tasks(write_shard, job, specs, **engine)
    for spec, written in zip(
        specs, _progress(results, len(specs), "writing shards", config.progress), strict=True
    ):
        shards[spec.name] = {
            "split": spec.split,
            "count": spec.stop - spec.start,
            "bytes": int(written["bytes"]),
            "sha256": bytes(written["sha256"]).hex(),
        }
        shard_of_row += [spec.name] * (spec.stop - spec.start)

    write_manifest(staging, manifest_columns(rows, shard_of_row, source), columns, rows.index)
    meta = describe(
        source,
        config,
        request,
        clean,
        noisy,
        groups,
        split_of,
        scan.stats,
        shards,
        near_duplicate_groups=num_duplicates,
        kept=[] if columns is None else columns.column_names,
    )
    write_description(staging, meta)
    publish(staging, out)
    print_summary(out, meta)
    return out


def _worker_source(source: Source) -> Source:
    """What a worker needs of the source to read images: not the manifest's own columns."""
    return dataclasses.replace(source, columns=None, split_of=None, group_of=None)


def _progress(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="shard", disable=not enabled, leave=False)

"""What `dtrain prepare` is asked to do: `PrepareConfig`, the one place where each option's
default, help text, flag spelling and text parsing are written (the command line is generated
from its fields), and the default output folder that follows from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtrain.config_values import option
from dtrain.errors import ConfigError
from dtrain.prepare.dedup import (
    BITS_PER_DECADE,
    DEFAULT_DISTANCE,
    EXACT_UP_TO,
    HASH_BITS,
    REFERENCE_IMAGES,
    SearchKind,
    default_distance,
)
from dtrain.prepare.engines import Engine
from dtrain.prepare.noise import NoiseModel
from dtrain.prepare.sources import DEFAULT_GROUP_COLUMNS, EMBEDDED_NAME, SPLIT_COLUMN, Source

FORMAT_VERSION = 1
# how the work is done, not what is written: a dataset built with other values is the same
OPERATIONAL = ("out", "overwrite", "progress", "workers", "engine", "address")
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
EMBEDDED_DEFAULT_NOISE: tuple[NoiseModel, float] = ("symmetric", 0.4)
DEFAULT_NOISE_RATE = 0.4


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """`1,2,0` -> [1, 2, 0], each item parsed by `kind`."""

    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",") if v.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in its errors
    return parse


def fractions(text: str) -> tuple[float, ...]:
    """`0.7,0.1,0.2` -> (0.7, 0.1, 0.2)."""
    return tuple(comma_list(float)(text))


def byte_size(text: str) -> int:
    """`500MB`, `2GB`, `1048576` -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


@dataclass
class PrepareConfig:
    """What `dtrain prepare` is asked to do. `noise=None` means: symmetric 0.4 for the embedded
    demo set (a benchmark), no noise for your own data (whose labels are what they are)."""

    source: str | None = option(
        None,
        "nothing (the embedded Br35H brain-MRI set), an image folder root/<class>/*, a "
        ".csv/.parquet manifest with path,label columns, or a MedMNIST-format .npz",
        positional=True,
        default_help="the embedded Br35H set",
    )
    out: str | None = option(
        None, "output folder", default_help="data/<name>_<noise><rate>_seed<seed>"
    )
    classes: list[str] | None = option(
        None,
        "class names in index order, comma-separated",
        parse=comma_list(str),
        default_help="the sorted folder names or labels in the source",
    )
    noise: NoiseModel | None = option(
        None,
        "label noise on train (and val unless --clean-val), never on test",
        default_help="symmetric for the embedded set, none for your own data",
    )
    noise_rate: float | None = option(
        None, "fraction of wrong labels", default_help=f"{DEFAULT_NOISE_RATE:g}"
    )
    noise_map: list[int] | None = option(
        None,
        "asymmetric noise: the wrong class of each class, e.g. 1,2,0; a class mapped to itself "
        "keeps its labels (0,0: only class 1 flips, to 0)",
        parse=comma_list(int),
        default_help="the next class",
    )
    # val labels as noisy as train's by default: model selection then sees what users see
    noise_val: bool = option(
        True,
        "keep val labels clean",
        flag="--clean-val",
        default_help="val as noisy as train, as a real user's labels are",
    )
    seed: int = option(0, "seed of the split, the noise and the shard order")
    split: tuple[float, float, float] | None = option(
        None,
        "train,val,test fractions, each >= 0 (0 leaves that split empty, e.g. 0,0,1 for a "
        f"test-only set); a manifest's {SPLIT_COLUMN} column (train/val/test) is used instead",
        parse=fractions,
        default_help=",".join(f"{f:g}" for f in DEFAULT_SPLIT),
    )
    group_column: str | None = option(
        None,
        "manifest column naming each image's patient or study: images of one value, like "
        "near-duplicates, always land in one split",
        default_help=" or ".join(DEFAULT_GROUP_COLUMNS) + " where the manifest has it",
    )
    clean_label_column: str | None = option(
        None,
        "manifest column holding each image's clean label, for benchmark sets that ship both: "
        "`label` is then the noisy label trained on, the noise is measured from the "
        "difference, and runs report clean metrics and the wrong-label AUROC",
        default_help="none: the labels are what they are",
    )
    dedup_distance: int | None = option(
        None,
        f"Hamming distance (bits of a {HASH_BITS}-bit perceptual hash, the image's, its "
        "mirror's or a window's, against another image's) within which images share a "
        "near-duplicate group; lower it if distinct patients are joined, raise it if copies "
        "are missed",
        default_help=f"{DEFAULT_DISTANCE} up to {REFERENCE_IMAGES:,} images, {BITS_PER_DECADE} "
        "fewer per tenfold more",
    )
    dedup_search: SearchKind = option(
        "auto",
        "how images within --dedup-distance are found: exact (every pair compared, quadratic: "
        "10 s at 30k images on 2 cores, hours at a million) or inverted (an inverted file: each "
        "image against the lists of its nearest centres, near-linear, may miss a rare pair)",
        default_help=f"exact up to {EXACT_UP_TO:,} images, inverted above",
    )
    shard_size: int = option(1000, "samples per shard")
    shard_bytes: int | None = option(
        None, "bytes per shard, e.g. 500MB", parse=byte_size, default_help="no limit"
    )
    resize: int | None = option(
        None,
        "re-encode images with the shorter side this many pixels",
        default_help="keep the image bytes as they are",
    )
    workers: int | None = option(
        None,
        "processes (or Ray workers) reading and writing images",
        default_help="every core (with --address, the cluster's), one per 2,000 images at most",
    )
    engine: Engine = option(
        "process",
        "where the work runs: process (this machine) or ray (Ray workers: a private local Ray, or "
        "the cluster at --address; shards are then written where every node can reach --out)",
    )
    address: str = option("", "with --engine ray, a Ray cluster to join ('auto': this node's)")
    skip_bad_images: bool = option(False, "leave unreadable images out instead of failing")
    overwrite: bool = option(False, "replace a different dtrain dataset at --out")
    progress: bool = option(
        True, "hide the progress bars", flag="--no-progress", default_help="shown"
    )

    def resolved_noise(self) -> tuple[NoiseModel, float]:
        """The noise model and rate after the defaults that depend on the source."""
        if self.noise is None:
            is_embedded = self.source in (None, EMBEDDED_NAME)
            model, rate = EMBEDDED_DEFAULT_NOISE if is_embedded else ("none", 0.0)
            return model, rate if self.noise_rate is None else self.noise_rate
        rate = DEFAULT_NOISE_RATE if self.noise_rate is None else self.noise_rate
        return self.noise, 0.0 if self.noise == "none" else rate

    def noised_splits(self) -> list[str]:
        """The splits whose labels get noise; test never does."""
        return ["train", "val"] if self.noise_val else ["train"]

    def validate(self) -> None:
        """Refuse values no dataset can be built from (the noise is checked against the
        source's classes in `prepare`)."""
        if self.split is not None:
            if len(self.split) != 3 or not all(0 <= f <= 1 for f in self.split):
                raise ConfigError(
                    f"split {self.split} must be three fractions >= 0 (train,val,test)"
                )
            if abs(sum(self.split) - 1) > 1e-6:
                raise ConfigError(f"split fractions {self.split} must sum to 1")
        if self.dedup_distance is not None and not 0 <= self.dedup_distance <= HASH_BITS:
            raise ConfigError(
                f"dedup distance {self.dedup_distance} must lie in 0..{HASH_BITS} (bits)"
            )
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers {self.workers} must be at least 1")
        if self.address and self.engine != "ray":
            raise ConfigError(f"--address {self.address} joins a Ray cluster: add --engine ray")
        if self.shard_size < 1:
            raise ConfigError(f"shard size {self.shard_size} must be at least 1")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ConfigError(f"shard bytes {self.shard_bytes} must be positive")
        if self.resize is not None and self.resize < 8:
            raise ConfigError(f"resize {self.resize} must be at least 8 pixels")

    def distance(self, images: int) -> int:
        """The near-duplicate distance for a source of `images` images."""
        return default_distance(images) if self.dedup_distance is None else self.dedup_distance

    def split_fractions(self, source: Source) -> tuple[float, float, float] | None:
        """The fractions to split by, or None where the manifest's split column says."""
        if source.split_of is None:
            return self.split or DEFAULT_SPLIT
        if self.split is not None:
            raise ConfigError(
                f"--split {','.join(f'{f:g}' for f in self.split)} and the {SPLIT_COLUMN} "
                f"column of {source.description['manifest']} both say how to split; drop "
                "--split to keep the column's splits, or the column to split by fractions"
            )
        return None

    def request(self, source: Source) -> dict:
        """What determines the output bytes; two runs with equal requests write equal shards.
        The manifest's split, group and other columns enter as checksums (a source without
        them asks what it asked before they existed, so its dataset is still found intact)."""
        model, rate = self.resolved_noise()
        keep = {k: v for k, v in asdict(self).items() if k not in OPERATIONAL}
        for k in ("noise", "noise_rate", "group_column"):  # below: resolved, or as checksums
            del keep[k]
        if self.clean_label_column is None:  # as asked before the option existed
            del keep["clean_label_column"]
        if self.dedup_search == "auto":  # likewise
            del keep["dedup_search"]
        keep["dedup_distance"] = self.distance(len(source))
        fractions = self.split_fractions(source)
        keep["split"] = f"{SPLIT_COLUMN} column" if fractions is None else list(fractions)
        return {
            **keep,
            **source.request_columns,
            "noise": model,
            "noise_rate": rate,
            "source_kind": source.kind,
            "num_items": len(source),
            "format_version": FORMAT_VERSION,
        }


def default_out(config: PrepareConfig, source: Source) -> Path:
    """`data/<name>_<noise><rate>_seed<seed>`: different requests land in different folders."""
    model, rate = config.resolved_noise()
    noise = "clean" if model == "none" else f"{model}{rate:g}"
    return Path("data") / f"{source.name}_{noise}_seed{config.seed}"

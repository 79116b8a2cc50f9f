"""`dtrain prepare`: a labelled image source becomes `{train,val,test}-%06d.tar` WebDataset shards
with the clean label kept beside the noisy one, a `manifest.parquet` and a `dataset.json`.

Everything is derived from the request and the seed, so a rerun writes byte-identical shards. The
dataset is written to a hidden sibling folder and moved into place at the end: a crash never
leaves a half-written dataset, and an existing one is replaced only when it is the same request or
`overwrite` is set.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dtrain.errors import DataError
from dtrain.prepare.dedup import BadImageError, decode_thumbnail, near_duplicate_groups
from dtrain.prepare.noise import apply_noise, check_noise, transition_matrix
from dtrain.prepare.sources import Source, open_source
from dtrain.prepare.split import SPLITS, stratified_group_split

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
EMBEDDED_DEFAULT_NOISE = ("symmetric", 0.4)


@dataclass
class PrepareConfig:
    """What `dtrain prepare` is asked to do. `noise=None` means: symmetric 0.4 for the embedded
    demo set (a benchmark), no noise for your own data (whose labels are what they are)."""

    source: str | None = None
    out: str | None = None
    classes: list[str] | None = None
    noise: str | None = None
    noise_rate: float | None = None
    noise_map: list[int] | None = None
    noise_val: bool = True  # val labels as noisy as train's: model selection sees what users see
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    dedup_threshold: float = 0.95
    shard_size: int = 1000
    shard_bytes: int | None = None
    resize: int | None = None
    skip_bad_images: bool = False
    overwrite: bool = False
    progress: bool = True

    def resolved_noise(self) -> tuple[str, float]:
        if self.noise is None:
            is_embedded = self.source in (None, "br35h")
            model, rate = EMBEDDED_DEFAULT_NOISE if is_embedded else ("none", 0.0)
            return model, rate if self.noise_rate is None else self.noise_rate
        rate = 0.4 if self.noise_rate is None else self.noise_rate
        return self.noise, 0.0 if self.noise == "none" else rate

    def validate(self) -> None:
        if len(self.split) != 3 or any(f < 0 for f in self.split) or self.split[0] <= 0:
            raise ValueError(f"split {self.split} must be three fractions >= 0 with train > 0")
        if abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split fractions {self.split} must sum to 1")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup threshold {self.dedup_threshold} must lie in (0, 1]")
        if self.shard_size < 1:
            raise ValueError(f"shard size {self.shard_size} must be at least 1")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError(f"shard bytes {self.shard_bytes} must be positive")
        if self.resize is not None and self.resize < 8:
            raise ValueError(f"resize {self.resize} must be at least 8 pixels")

    def request(self, source: Source) -> dict:
        """What determines the output bytes; two runs with equal requests write equal shards."""
        model, rate = self.resolved_noise()
        keep = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("out", "overwrite", "progress", "noise", "noise_rate")
        }
        keep["split"] = list(self.split)
        return {
            **keep,
            "noise": model,
            "noise_rate": rate,
            "source_kind": source.kind,
            "num_items": len(source),
            "format_version": FORMAT_VERSION,
        }


def default_out(config: PrepareConfig, source: Source) -> Path:
    model, rate = config.resolved_noise()
    noise = "clean" if model == "none" else f"{model}{rate:g}"
    return Path("data") / f"{source.name}_{noise}_seed{config.seed}"


def _resize(data: bytes, ext: str, side: int) -> tuple[bytes, str]:
    """Shorter side to `side` pixels; JPEG stays JPEG (quality 95), anything else becomes PNG."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    scale = side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image.draft(None, size)
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    if ext == "jpg":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            buffer, format="JPEG", quality=95
        )
        return buffer.getvalue(), "jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not enabled, leave=False)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_destination(out: Path, request: dict, overwrite: bool) -> bool:
    """True when `out` already holds this exact dataset intact; raises when it may not be
    replaced."""
    if not out.exists():
        return False
    if out.is_file():
        raise DataError(f"output {out} is a file; choose a folder with --out")
    meta_path = out / DATASET_JSON
    if not meta_path.is_file():
        if any(out.iterdir()):
            raise DataError(
                f"output folder {out} is not empty and holds no {DATASET_JSON}: it is not a dtrain "
                "dataset, so it is left alone; choose another --out"
            )
        return False
    old = json.loads(meta_path.read_text())
    if old.get("request") == request:
        return all(
            (out / name).is_file() and _sha256(out / name) == info["sha256"]
            for name, info in old["shards"].items()
        )
    if not overwrite:
        changed = sorted(
            k
            for k in set(request) | set(old.get("request", {}))
            if request.get(k) != old.get("request", {}).get(k)
        )
        raise DataError(
            f"{out} holds a different dataset (differs in: {', '.join(changed)}); pass "
            "--overwrite to replace it or choose another --out"
        )
    return False


TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar pads each file to a multiple of this


def _tar_bytes(sample: dict) -> int:
    """Bytes a sample adds to a tar file: a header block per member plus its padded payload."""
    return sum(
        TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if k != "__key__"
    )


def _write_shards(
    staging: Path, source: Source, rows: list[dict], config: PrepareConfig, split: str
) -> dict[str, dict]:
    """Write one split's rows in order, starting a new shard when the next sample would pass
    `shard_size` samples or `shard_bytes` file bytes (tar's final record padding aside).
    Returns shard name -> {split, count} and records each row's shard."""
    import webdataset as wds

    shards: dict[str, dict] = {}
    writer, size, count = None, 0, 0
    max_bytes = config.shard_bytes or float("inf")
    try:
        for row in _progress(rows, len(rows), f"writing {split}", config.progress):
            data, ext = source.read(row["index"])
            if config.resize:
                data, ext = _resize(data, ext, config.resize)
            record = {
                "clean_label": row["clean_label"],
                "noisy_label": row["noisy_label"],
                "source": row["source"],
                "group": row["group"],
            }
            sample = {
                "__key__": row["key"],
                ext: data,
                "cls": str(row["noisy_label"]).encode(),
                "json": json.dumps(record, sort_keys=True).encode(),
            }
            nbytes = _tar_bytes(sample)
            if writer is None or count >= config.shard_size or size + nbytes > max_bytes:
                if writer is not None:
                    writer.close()
                name = f"{split}-{len(shards):06d}.tar"
                # integer mtime: a float one makes tarfile add a PAX header to every member
                writer = wds.TarWriter(str(staging / name), mtime=0)
                shards[name] = {"split": split, "count": 0}
                size, count = 2 * TAR_BLOCK, 0  # the end-of-archive blocks
            writer.write(sample)
            size += nbytes
            count += 1
            shards[name]["count"] = count
            row["shard"] = name
    finally:
        if writer is not None:
            writer.close()
    return shards


def prepare(config: PrepareConfig) -> Path:
    """Build the dataset `config` asks for and return its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config.validate()
    source = open_source(config.source, config.classes)
    noise_model, noise_rate = config.resolved_noise()
    check_noise(noise_model, noise_rate, len(source.classes), config.noise_map)
    out = Path(config.out) if config.out else default_out(config, source)
    request = config.request(source)
    if _check_destination(out, request, config.overwrite):
        print(f"{out} already holds this dataset; nothing to do")
        return out

    thumbs, kept, image_stats = _scan(source, config)
    clean = source.labels[kept]
    groups = near_duplicate_groups(thumbs, config.dedup_threshold)
    split_of = stratified_group_split(clean, groups, config.split, config.seed)
    noisy = clean.copy()
    noised_splits = ["train", "val"] if config.noise_val else ["train"]
    for s, name in enumerate(SPLITS):
        if name in noised_splits:
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
    print(
        f"{source.name}: {len(kept)} images, {groups.max() + 1} near-duplicate groups "
        f"(correlation > {config.dedup_threshold} on {thumbs.shape[1]}px thumbnails)"
    )

    rng = np.random.default_rng(config.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
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
        shards.update(_write_shards(staging, source, rows, config, split))
        rows_all += rows
    for name, info in shards.items():
        info["bytes"] = (staging / name).stat().st_size
        info["sha256"] = _sha256(staging / name)

    columns = ["key", "shard", "split", "clean_label", "noisy_label", "is_noisy", "group", "source"]
    table = pa.table({c: [r[c] for r in rows_all] for c in columns})
    pq.write_table(table, staging / MANIFEST)

    num_classes = len(source.classes)
    per_split = {}
    for s, split in enumerate(SPLITS):
        members = split_of == s
        per_split[split] = {
            "count": int(members.sum()),
            "groups": int(len(np.unique(groups[members]))),
            "per_class_clean": np.bincount(clean[members], minlength=num_classes).tolist(),
            "per_class_noisy": np.bincount(noisy[members], minlength=num_classes).tolist(),
            "noise_rate": float((clean[members] != noisy[members]).mean())
            if members.any()
            else 0.0,
            "transition_matrix": transition_matrix(clean[members], noisy[members], num_classes)
            .round(6)
            .tolist(),
        }
    meta = {
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
            "splits": noised_splits,
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
    (staging / DATASET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
    _print_summary(out, meta)
    return out


def _print_summary(out: Path, meta: dict) -> None:
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

"""Streaming loader over WebDataset shards for the trainer.

Each (rank, worker) slot streams its own shards. Per-shard sample counts (from the `dataset.json`
that `dtrain prepare` writes beside the shards) let every process compute the same plan: which
shards each slot reads this epoch and how many batches each rank yields. Every batch is full; the
slots that run short are topped up with *padding* (copies of their own samples, `valid=False`), so
that each sample is seen exactly once per epoch over all ranks and workers while every rank yields
the same number of batches (no DDP hang on uneven shards). A resampled mode instead draws shards
with replacement for a fixed number of samples per epoch.

Only image members, `.cls` and `.json` are decoded; nothing is ever unpickled, whatever members a
shard holds. A sample that cannot be decoded is replaced by padding, counted (`corrupt=True`) and
logged, or raises with `strict=True`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtrain.errors import DataError
from dtrain.train.transforms import (
    center_crop,
    decode_image,
    decode_side,
    jitter_and_normalise,
    normalise,
    random_flip,
    random_resized_crop,
    stack,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")


class CorruptSampleError(DataError):
    """A sample whose image or label cannot be decoded."""


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern (`train-{000000..000009}.tar`), `::`-separated patterns, or a list."""
    if isinstance(urls, (str, os.PathLike)):
        return list(wds.shardlists.expand_urls(str(urls)))
    return [u for url in urls for u in wds.shardlists.expand_urls(str(url))]


def split_urls(dataset_dir: str | Path, split: str) -> list[str]:
    """The shards of one split of a `dtrain prepare` folder, in order."""
    meta = read_dataset_json(str(dataset_dir))
    names = sorted(n for n, info in meta["shards"].items() if info["split"] == split)
    if not names:
        raise DataError(f"{dataset_dir} has no {split} shards")
    return [str(Path(dataset_dir) / n) for n in names]


def shard_dir(shard_url: str) -> str:
    return shard_url.rsplit("/", 1)[0] if "/" in shard_url else "."


def read_dataset_json(base: str) -> dict:
    """The `dataset.json` of a dataset folder, local or at any URL webdataset can open."""
    url = f"{base}/dataset.json"
    try:
        with wds.gopen(url) as stream:
            return json.loads(stream.read())
    except Exception as err:  # gopen raises OSError, ValueError or a pipe error by scheme
        raise DataError(
            f"cannot read {url} ({err}); pass shard_counts= for shards that `dtrain prepare` "
            "did not write, or use resampled mode"
        ) from err


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each slot reads, and how many batches each slot yields, in one epoch."""

    shards: list[list[str]]  # per slot, slot = rank * workers + worker
    samples: list[int]  # real samples per slot
    batches: list[int]  # batches per slot, padding included

    def rank_batches(self, rank: int, workers: int) -> int:
        return sum(self.batches[rank * workers : (rank + 1) * workers])


def plan_epoch(
    counts: dict[str, int],
    world_size: int,
    workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    split_samples: bool = False,
) -> EpochPlan:
    """Balanced shard assignment (largest first to the emptiest slot, in a seeded random order
    among equals) and the padding that gives every rank the same number of full batches.

    `split_samples` (evaluation on fewer shards than readers): every slot reads every shard in
    order and keeps the samples whose running index is its own modulo the slot count."""
    slots = world_size * workers
    urls = list(counts)
    if split_samples:
        total = sum(counts.values())
        assigned = [list(urls) for _ in range(slots)]
        return _equalise(
            assigned,
            [len(range(s, total, slots)) for s in range(slots)],
            world_size,
            workers,
            batch_size,
        )
    if len(urls) < slots:
        raise DataError(
            f"{len(urls)} shards cannot feed {world_size} ranks x {workers} workers = {slots} "
            f"readers; write more, smaller shards (dtrain prepare --shard-size), use fewer "
            "workers, or use resampled mode"
        )
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(urls)
    urls.sort(key=lambda u: -counts[u])
    assigned: list[list[str]] = [[] for _ in range(slots)]
    samples = [0] * slots
    for url in urls:
        slot = min(range(slots), key=lambda s: (samples[s], s))
        assigned[slot].append(url)
        samples[slot] += counts[url]
    return _equalise(assigned, samples, world_size, workers, batch_size)


def _equalise(
    assigned: list[list[str]], samples: list[int], world_size: int, workers: int, batch_size: int
) -> EpochPlan:
    """Padding batches so that every rank yields as many batches as the busiest one."""
    batches = [math.ceil(n / batch_size) for n in samples]
    per_rank = [sum(batches[r * workers : (r + 1) * workers]) for r in range(world_size)]
    target = max(per_rank)
    for rank in range(world_size):
        extra = target - per_rank[rank]
        for w in range(workers):
            batches[rank * workers + w] += extra // workers + (w < extra % workers)
    return EpochPlan(assigned, samples, batches)


def _decode(sample: dict, num_classes: int | None, channels: int, min_side: int) -> dict:
    where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
    image_keys = [k for k in IMAGE_EXTS if k in sample]
    if not image_keys:
        raise CorruptSampleError(f"{where} has no image member ({', '.join(IMAGE_EXTS)})")
    if "cls" not in sample:
        raise CorruptSampleError(f"{where} has no .cls label")
    try:
        label = int(sample["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptSampleError(f"{where}: .cls is not an integer label") from err
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise CorruptSampleError(f"{where}: label {label} is outside [0, {num_classes})")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        image = decode_image(sample[image_keys[0]], channels, min_side)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise CorruptSampleError(f"{where}: cannot decode ({err})") from err
    return {
        "image": image,
        "label": label,
        "clean_label": int(meta.get("clean_label", label)),
        "key": sample["__key__"],
    }


class ShardStream(IterableDataset):
    """Batches (dicts of tensors) for one rank; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, int] | None,
        *,
        train: bool,
        batch_size: int,
        image_size: int,
        channels: int,
        num_classes: int | None,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
        samples_per_epoch: int | None,
        strict: bool,
    ) -> None:
        self.urls, self.counts, self.train = urls, counts, train
        self.batch_size, self.channels, self.num_classes = batch_size, channels, num_classes
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.seed, self.shuffle_buffer, self.strict = seed, shuffle_buffer, strict
        self.samples_per_epoch = samples_per_epoch
        self.min_side = decode_side(image_size, train)
        self.image_size = image_size
        self.epoch = 0
        # evaluation on fewer shards than readers: split by sample instead of by shard
        slots = world_size * workers
        self.split_samples = not train and counts is not None and len(counts) < slots

    def plan(self) -> EpochPlan | None:
        if self.counts is None:
            return None
        return plan_epoch(
            self.counts,
            self.world_size,
            self.workers,
            self.batch_size,
            self.seed,
            self.epoch,
            shuffle=self.train,
            split_samples=self.split_samples,
        )

    def resampled_batches_per_slot(self) -> int:
        slots = self.world_size * self.workers
        return math.ceil(self.samples_per_epoch / (slots * self.batch_size))

    def batches_per_rank(self) -> int:
        if self.samples_per_epoch is not None:
            return self.resampled_batches_per_slot() * self.workers
        return self.plan().rank_batches(self.rank, self.workers)

    def _slot(self) -> int:
        info = get_worker_info()
        return self.rank * self.workers + (info.id if info else 0)

    def _raw_samples(self, slot: int, plan: EpochPlan | None) -> Iterator[dict]:
        rng = random.Random(hash((self.seed, self.epoch, slot)))
        if plan is None:  # resampled: shards drawn with replacement, forever

            def urls():
                while True:
                    yield {"url": rng.choice(self.urls)}

            source = urls()
        else:
            shards = list(plan.shards[slot])
            if self.train:
                rng.shuffle(shards)
            source = [{"url": u} for u in shards]
        samples = wds.tarfile_to_samples(handler=_reraise_with_shard)(source)
        if self.split_samples:
            slots = self.world_size * self.workers
            samples = (x for n, x in enumerate(samples) if n % slots == slot)
        if self.train:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 4, rng=rng)(
                samples
            )
        return samples

    def _samples(self, slot: int, plan: EpochPlan | None, total: int) -> Iterator[dict]:
        """Exactly `total` decoded samples: the slot's own, then padding. A corrupt sample is
        replaced by padding right away, so every count in the plan holds."""
        recent: deque[dict] = deque(maxlen=self.batch_size)
        owed_corrupt = emitted = read = 0
        for raw in self._raw_samples(slot, plan):
            if plan is None and emitted >= total:
                break
            read += 1
            if plan is not None and read > plan.samples[slot]:
                break  # more than dataset.json says: fail now, before the ranks drift apart
            try:
                sample = _decode(raw, self.num_classes, self.channels, self.min_side)
            except CorruptSampleError as err:
                if self.strict:
                    raise
                log.warning("skipping corrupt %s", err)
                owed_corrupt += 1
                continue
            recent.append(sample)
            yield {**sample, "valid": True, "corrupt": False}
            emitted += 1
            for _ in range(owed_corrupt):
                yield {**sample, "valid": False, "corrupt": True}
            emitted += owed_corrupt
            owed_corrupt = 0
        if plan is not None and read != plan.samples[slot]:
            read = read if read <= plan.samples[slot] else f"more than {plan.samples[slot]}"
            raise DataError(
                f"shards {plan.shards[slot]} hold {read} samples but their dataset.json says "
                f"{plan.samples[slot]}; re-create them with dtrain prepare"
            )
        if not recent:
            raise DataError(
                f"rank {self.rank} slot {slot} read no decodable sample from "
                f"{plan.shards[slot] if plan else self.urls}"
            )
        for pad in range(total - emitted):
            corrupt = pad < owed_corrupt
            yield {**recent[pad % len(recent)], "valid": False, "corrupt": corrupt}

    def _collate(self, samples: list[dict]) -> dict:
        batch = {
            "label": torch.tensor([s["label"] for s in samples]),
            "clean_label": torch.tensor([s["clean_label"] for s in samples]),
            "valid": torch.tensor([s["valid"] for s in samples]),
            "corrupt": torch.tensor([s["corrupt"] for s in samples]),
            "key": [s["key"] for s in samples],
        }
        size = self.image_size
        if self.train:
            for view in ("view1", "view2"):
                crops = stack([random_resized_crop(s["image"], size) for s in samples])
                batch[view] = jitter_and_normalise(random_flip(crops))
        else:
            batch["image"] = normalise(stack([center_crop(s["image"], size) for s in samples]))
        return batch

    def __iter__(self) -> Iterator[dict]:
        slot = self._slot()
        info = get_worker_info()
        plan = self.plan() if self.samples_per_epoch is None else None
        num_batches = self.resampled_batches_per_slot() if plan is None else plan.batches[slot]
        # augmentations draw from torch's global generator: seed it per (epoch, slot) in a worker
        # process; in the main process, swap in a private state so training RNG is untouched
        aug_state = torch.Generator().manual_seed(hash((self.seed, self.epoch, slot)) % 2**63)
        if info is not None:
            torch.set_rng_state(aug_state.get_state())
        chunk: list[dict] = []
        for sample in self._samples(slot, plan, num_batches * self.batch_size):
            chunk.append(sample)
            if len(chunk) < self.batch_size:
                continue
            if info is not None:
                yield self._collate(chunk)
            else:
                outer = torch.get_rng_state()
                torch.set_rng_state(aug_state.get_state())
                batch = self._collate(chunk)
                aug_state.set_state(torch.get_rng_state())
                torch.set_rng_state(outer)
                yield batch
            chunk = []


def _reraise_with_shard(exn: Exception) -> bool:
    raise DataError(f"cannot read shard: {exn}; re-create it with dtrain prepare") from exn


class ShardLoader:
    """A DataLoader over a ShardStream, with `set_epoch` and a known length per epoch."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool) -> None:
        self.stream = stream
        # its own generator: creating an iterator must not draw from the training RNG
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if num_workers else None,
            generator=torch.Generator().manual_seed(stream.seed),
        )

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.stream.batches_per_rank()

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)

    def describe(self) -> str:
        s = self.stream
        if s.samples_per_epoch is not None:
            return (
                f"resampled: {s.samples_per_epoch} samples per epoch over "
                f"{s.world_size} rank(s); {len(self)} batches of {s.batch_size} per rank"
            )
        plan = s.plan()
        total = sum(plan.samples)
        padding = len(self) * s.world_size * s.batch_size - total
        return (
            f"{total} samples in {len(s.urls)} shards over {s.world_size} rank(s) x "
            f"{s.workers} worker(s); {len(self)} batches of {s.batch_size} per rank "
            f"({padding} padding)"
        )


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def make_loader(
    urls: str | Sequence[str],
    *,
    train: bool,
    batch_size: int,
    image_size: int = 64,
    channels: int | None = None,
    num_classes: int | None = None,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    shard_counts: dict[str, int] | None = None,
    strict: bool = False,
    pin_memory: bool = False,
) -> ShardLoader:
    """A loader for one rank. Rank and world size default to torch.distributed or RANK and
    WORLD_SIZE. Channels and classes default to the `dataset.json` beside the shards."""
    shard_urls = expand_urls(urls)
    if not shard_urls:
        raise DataError(f"no shards match {urls!r}")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if resampled and not samples_per_epoch:
        raise ValueError("resampled mode needs samples_per_epoch")
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    meta = None
    if shard_counts is None or channels is None or num_classes is None:
        try:
            meta = read_dataset_json(shard_dir(shard_urls[0]))
        except DataError:
            if not resampled and shard_counts is None:
                raise
    if not resampled and shard_counts is None:
        by_name = {name: info["count"] for name, info in meta["shards"].items()}
        missing = [u for u in shard_urls if u.rsplit("/", 1)[-1] not in by_name]
        if missing:
            raise DataError(f"shard {missing[0]} is not listed in its dataset.json")
        shard_counts = {u: by_name[u.rsplit("/", 1)[-1]] for u in shard_urls}
    if meta is not None:
        channels = channels or meta["images"]["channels"]
        num_classes = num_classes or len(meta["classes"])
    workers = max(1, num_workers)
    stream = ShardStream(
        shard_urls,
        None if resampled else shard_counts,
        train=train,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels or 3,
        num_classes=num_classes,
        rank=rank,
        world_size=world_size,
        workers=workers,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        samples_per_epoch=samples_per_epoch if resampled else None,
        strict=strict,
    )
    if not resampled:
        stream.plan()  # fail now, not inside a worker, if shards < ranks x workers
    return ShardLoader(stream, num_workers, pin_memory)

"""Streaming loader over WebDataset shards for the trainer.

Each (rank, worker) slot streams its own shards. Per-shard sample counts (from the `dataset.json`
that `dtrain prepare` or `dtrain index` writes) let every process compute the same plan: which
shards each slot reads this epoch and how many batches each rank yields. Every batch is full; the
slots that run short are topped up with *padding* (copies of their own samples, `valid=False`), so
that each sample is seen exactly once per epoch over all ranks and workers while every rank yields
the same number of batches (no DDP hang on uneven shards). A resampled mode instead draws shards
with replacement for a fixed number of samples per epoch.

Only image members, `.cls` and `.json` are decoded; nothing is ever unpickled, whatever members a
shard holds. A sample that cannot be decoded, or that a damaged shard no longer holds
(`shard_reader.py` checks each shard's end, count and checksum as it streams), is replaced by
padding, counted (`corrupt=True`), logged and named in its batch's `skipped`; or raises with
`strict=True`.

`set_epoch(epoch, start_batch)` starts an epoch part-way (a resumed run): the skipped batches' raw
samples are read, keeping the shuffle in step, but not decoded; augmentations are seeded per batch,
so the batches that follow are exactly those of a full pass. Planning is in `loader_plan.py`;
dataset folders, `dataset.json` and sample decoding in `format.py`; reading a shard in
`shard_reader.py`; transforms and collation in `transforms.py`; how workers start in
`workers.py`.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import deque
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtrain.dataset.format import (
    CorruptSampleError,
    decode_sample,
    expand_urls,
    read_dataset_json,
    shard_dir,
    shard_entries,
    split_urls,
)
from dtrain.dataset.loader_plan import EpochPlan, plan_epoch, worker_skips
from dtrain.dataset.shard_reader import RawSample, read_shard
from dtrain.dataset.transforms import collate, decode_side
from dtrain.dataset.workers import worker_context, worker_init
from dtrain.errors import DataError

__all__ = [
    "CorruptSampleError",
    "ShardLoader",
    "ShardStream",
    "expand_urls",
    "make_loader",
    "read_dataset_json",
    "split_urls",
]

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Batches (dicts of tensors) for one rank; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, int] | None,
        digests: dict[str, str],
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
        label_key: str | None = None,
        classes: list[str] | None = None,
        relabel: dict[str, int] | None = None,
        clean_labels: bool = False,
    ) -> None:
        self.urls, self.counts, self.digests, self.train = urls, counts, digests, train
        self.label_key, self.classes, self.relabel = label_key, classes, relabel or {}
        self.clean_labels = clean_labels
        self.batch_size, self.channels, self.num_classes = batch_size, channels, num_classes
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.seed, self.shuffle_buffer, self.strict = seed, shuffle_buffer, strict
        self.samples_per_epoch = samples_per_epoch
        self.min_side = decode_side(image_size, train)
        self.image_size = image_size
        self.epoch = self.start_batch = 0
        # evaluation on fewer shards than readers: split by sample instead of by shard
        slots = world_size * workers
        self.split_samples = not train and counts is not None and len(counts) < slots
        self._planned: tuple[int, EpochPlan] | None = None  # (epoch, its plan)

    def plan(self) -> EpochPlan | None:
        """This epoch's plan, made once (the trainer asks for the length at every log step)."""
        if self.counts is None:
            return None
        if self._planned is None or self._planned[0] != self.epoch:
            sizes = (self.world_size, self.workers, self.batch_size, self.seed, self.epoch)
            split = self.split_samples
            plan = plan_epoch(self.counts, *sizes, shuffle=self.train, split_samples=split)
            self._planned = (self.epoch, plan)
        return self._planned[1]

    def resampled_batches_per_slot(self) -> int:
        slots = self.world_size * self.workers
        return math.ceil(self.samples_per_epoch / (slots * self.batch_size))

    def batches_per_rank(self) -> int:
        if self.samples_per_epoch is not None:
            return self.resampled_batches_per_slot() * self.workers
        return self.plan().rank_batches(self.rank, self.workers)

    def _raw_samples(self, slot: int, plan: EpochPlan | None) -> Iterator[RawSample]:
        """The slot's samples in reading order: exactly `plan.samples[slot]` of them (a shard
        short of its count makes up the difference with skips), or endless when resampled."""
        rng = random.Random(hash((self.seed, self.epoch, slot)))
        if plan is None:  # resampled: shards drawn with replacement, forever

            def urls():
                while True:
                    yield rng.choice(self.urls)

            source = urls()
        else:
            source = list(plan.shards[slot])
            if self.train:
                rng.shuffle(source)
        samples = (
            sample
            for url in source
            for sample in read_shard(
                url, None if plan is None else self.counts[url], self.digests.get(url), self.strict
            )
        )
        if self.split_samples:
            slots = self.world_size * self.workers
            samples = (x for n, x in enumerate(samples) if n % slots == slot)
        if self.train:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 4, rng=rng)(
                samples
            )
        return samples

    def _decode(self, raw: RawSample) -> dict | str:
        """The decoded sample, or why it is skipped if it is corrupt and not `strict`."""
        try:
            sample = decode_sample(
                raw, self.num_classes, self.channels, self.min_side, self.label_key, self.classes
            )
        except CorruptSampleError as err:
            if self.strict:
                raise
            return str(err)
        if self.clean_labels:
            sample["label"] = sample["clean_label"]
        sample["label"] = self.relabel.get(sample["key"], sample["label"])
        return sample

    def _samples(
        self, slot: int, plan: EpochPlan | None, total: int, skip: int = 0
    ) -> Iterator[dict]:
        """Exactly `total` decoded samples, the slot's own then padding, less the first `skip`.
        A corrupt or missing sample is replaced by padding right away, so every count in the plan
        holds (resampled, it uses up one of the epoch's samples). The first `skip` samples are read
        (the shuffle buffer stays in step) but not decoded; the last `batch_size` of them are kept
        raw in case the padding copies them."""
        recent: deque[dict] = deque(maxlen=self.batch_size)
        skipped: deque[RawSample] = deque(maxlen=self.batch_size)
        owed: list[str] = []  # why each sample not yet replaced by padding was skipped
        logged: set[str] = set()  # a damaged shard's missing samples share one reason
        emitted = 0
        for raw in self._raw_samples(slot, plan):
            if plan is None and emitted + len(owed) >= total:
                break
            if emitted < skip:
                skipped.append(raw)
                emitted += 1
                continue
            sample = self._decode(raw)
            if isinstance(sample, str):
                if sample not in logged:
                    log.warning("skipping %s", sample)
                    logged.add(sample)
                owed.append(sample)
                continue
            recent.append(sample)
            yield {**sample, "valid": True, "corrupt": False, "skipped": None}
            for reason in owed:
                yield {**sample, "valid": False, "corrupt": True, "skipped": reason}
            emitted += 1 + len(owed)
            owed = []
        pads = range(max(skip - emitted, 0), total - emitted)
        if not pads:
            return
        while skipped and len(recent) < self.batch_size:  # what a full pass would hold
            sample = self._decode(skipped.pop())
            if not isinstance(sample, str):
                recent.appendleft(sample)
        if not recent:
            raise DataError(
                f"rank {self.rank} slot {slot} read no decodable sample from "
                f"{plan.shards[slot] if plan else self.urls}"
            )
        for pad in pads:
            reason = owed[pad] if pad < len(owed) else None
            sample = recent[pad % len(recent)]
            yield {**sample, "valid": False, "corrupt": reason is not None, "skipped": reason}

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan() if self.samples_per_epoch is None else None
        if plan is None:
            per_worker = [self.resampled_batches_per_slot()] * self.workers
        else:
            per_worker = plan.batches[self.rank * self.workers : (self.rank + 1) * self.workers]
        skips, lead = worker_skips(per_worker, self.start_batch)
        # the DataLoader asks its workers in turn from worker 0: that one plays the `lead` worker
        info = get_worker_info()
        worker = ((info.id if info else 0) + lead) % self.workers
        slot, first = self.rank * self.workers + worker, skips[worker]
        size = self.batch_size
        samples = self._samples(slot, plan, per_worker[worker] * size, first * size)
        chunk: list[dict] = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) < size:
                continue
            if not self.train:
                batch = collate(chunk, self.image_size, self.train)
            else:
                # augmentations draw from torch's global CPU generator: seed it per batch (so a
                # skipped batch changes no other) and restore it after (in the main process, the
                # caller's RNG stays untouched)
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(
                        hash((self.seed, self.epoch, slot, first)) % 2**63
                    )
                    batch = collate(chunk, self.image_size, self.train)
            yield batch
            first += 1
            chunk = []


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
            worker_init_fn=worker_init,
            multiprocessing_context=worker_context() if num_workers else None,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterations from now on yield epoch `epoch` from batch `start_batch` on: exactly the
        batches `start_batch, ..., len(self) - 1` of a full pass (a resumed run's exact data),
        without decoding or augmenting the samples of the batches before it. Exact as long as
        none of the skipped samples is corrupt (they are not decoded, so a corrupt one cannot
        be noticed; the batch count and the padding still hold, so no rank waits on another)."""
        self.stream.epoch, self.stream.start_batch = epoch, 0
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}]")
        self.stream.start_batch = start_batch

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
    meta: dict | None = None,
    relabel: dict[str, int] | None = None,
    clean_labels: bool = False,
) -> ShardLoader:
    """A loader for one rank. Rank and world size default to torch.distributed or RANK and
    WORLD_SIZE. Counts, channels and classes default to the shards' `dataset.json`, `meta` (the
    dataset folder's) or else the one beside the first shard; each shard read to its end must
    match the checksum it lists. `relabel` replaces the label of the samples it names (by key):
    the corrections of a label clean-up round. `clean_labels` hands out each sample's clean label
    as its label (a benchmark's ceiling)."""
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
    if meta is None and (shard_counts is None or channels is None or num_classes is None):
        try:
            meta = read_dataset_json(shard_dir(shard_urls[0]))
        except DataError:
            if not resampled and shard_counts is None:
                raise
    listed = shard_entries(meta, shard_urls) if meta is not None else {}
    if not resampled and shard_counts is None:
        missing = [u for u in shard_urls if u not in listed]
        if missing:
            raise DataError(f"shard {missing[0]} is not listed in its dataset.json")
        shard_counts = {u: listed[u]["count"] for u in shard_urls}
    digests = {u: info["sha256"] for u, info in listed.items() if "sha256" in info}
    label_key = classes = None
    if meta is not None:
        channels = channels or meta["images"]["channels"]
        num_classes = num_classes or len(meta["classes"])
        # shards indexed with `dtrain index` say where their label is and what it names
        label_key = meta.get("label_key")
        classes = meta["classes"] if label_key else None
    workers = max(1, num_workers)
    stream = ShardStream(
        shard_urls,
        None if resampled else shard_counts,
        digests,
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
        label_key=label_key,
        classes=classes,
        relabel=relabel,
        clean_labels=clean_labels,
    )
    if not resampled:
        stream.plan()  # fail now, not inside a worker, if shards < ranks x workers
    return ShardLoader(stream, num_workers, pin_memory)

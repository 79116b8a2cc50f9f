"""The streaming loader: exactly-once coverage with equal batch counts over ranks and workers,
corrupt samples skipped or fatal, seeded shuffling, exact mid-epoch starts that
decode nothing they skip, clear errors; and the data folder a run trains on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import PROCS, copy_dataset, rewrite_shard, write_folder

from dtrain import stop_signal
from dtrain.dataset import loader as data_module
from dtrain.dataset.loader import CorruptSampleError, make_loader, split_urls
from dtrain.dataset.loader_plan import plan_epoch, worker_order, worker_skips
from dtrain.errors import DataError
from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.data_folder import resolve_data_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """120 images, all in train, in 18 shards of 7 (the last holds 1): uneven on purpose."""
    root = tmp_path_factory.mktemp("loader")
    folder = write_folder(root / "images", {"a": 40, "b": 40, "c": 40}, fmt="jpg")
    return prepare(
        PrepareConfig(
            source=str(folder),
            out=str(root / "ds"),
            split=(1.0, 0, 0),
            shard_size=7,
            noise="symmetric",
            noise_rate=0.3,
            progress=False,
        )
    )


def all_keys(dataset: Path) -> set[str]:
    return {k for name in dataset.glob("*.tar") for k in _tar_keys(name)}


def _tar_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


@pytest.mark.parametrize("mode, shards", [("train", 18), ("eval", 18), ("eval", 3)])
@pytest.mark.multiproc
def test_each_sample_exactly_once_with_equal_batches_over_2_ranks_x_2_workers(
    dataset, tmp_path, mode, shards
):
    """3 shards for 4 readers: evaluation then splits by sample instead of by shard."""
    procs = []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.json"
        procs.append(
            (
                out,
                subprocess.Popen(
                    [
                        sys.executable,
                        str(PROCS / "loader_rank.py"),
                        str(dataset),
                        str(rank),
                        "2",
                        mode,
                        str(out),
                        str(shards),
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    results = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.read_text()))
    first = sorted(dataset.glob("train-*.tar"))[:shards]
    expected = {k for shard in first for k in _tar_keys(shard)}
    assert len(expected) == min(120, 7 * shards)
    for epoch in ("0", "1"):
        keys = results[0][epoch]["keys"] + results[1][epoch]["keys"]
        assert sorted(keys) == sorted(expected)  # every sample once, none twice
        assert results[0][epoch]["batches"] == results[1][epoch]["batches"]
        assert results[0][epoch]["batches"] == results[0][epoch]["len"]
    if mode == "train":  # seeded reshuffle: the epochs differ in order
        assert results[0]["0"]["keys"] != results[0]["1"]["keys"]


def test_batches_hold_two_views_labels_and_clean_labels(dataset):
    loader = make_loader(split_urls(dataset, "train"), train=True, batch_size=16, image_size=24)
    batch = next(iter(loader))
    assert batch["view1"].shape == batch["view2"].shape == (16, 1, 24, 24)
    assert not torch.equal(batch["view1"], batch["view2"])
    assert batch["view1"].min() >= -1 and batch["view1"].max() <= 1
    labels = {}
    for shard in dataset.glob("*.tar"):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            labels[sample["__key__"]] = (
                int(sample["cls"]),
                json.loads(sample["json"])["clean_label"],
            )
    for key, label, clean in zip(
        batch["key"], batch["label"].tolist(), batch["clean_label"].tolist(), strict=True
    ):
        assert labels[key] == (label, clean)
    print(loader.describe())
    assert "120 samples in 18 shards" in loader.describe()


def test_shuffling_is_seeded_and_leaves_the_callers_rng_alone(dataset):
    def first_batch(seed, epoch):
        loader = make_loader(
            split_urls(dataset, "train"), train=True, batch_size=8, image_size=16, seed=seed
        )
        loader.set_epoch(epoch)
        return next(iter(loader))

    torch.manual_seed(0)
    a = first_batch(1, 0)
    after = torch.rand(3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    assert torch.equal(after, expected)  # augmenting did not consume the training RNG
    b = first_batch(1, 0)
    assert a["key"] == b["key"] and torch.equal(a["view1"], b["view1"])
    assert first_batch(1, 1)["key"] != a["key"]
    assert first_batch(2, 0)["key"] != a["key"]


def test_eval_is_deterministic(dataset):
    def keys_and_pixels():
        loader = make_loader(
            split_urls(dataset, "train"), train=False, batch_size=10, image_size=16, num_workers=2
        )
        batches = list(loader)
        return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])

    (k1, p1), (k2, p2) = keys_and_pixels(), keys_and_pixels()
    assert k1 == k2 and torch.equal(p1, p2)


def test_resampled_mode_gives_a_fixed_number_of_full_batches(dataset):
    loader = make_loader(
        split_urls(dataset, "train"),
        train=True,
        batch_size=8,
        image_size=16,
        resampled=True,
        samples_per_epoch=50,
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    assert all(b["valid"].all() for b in batches)


@pytest.fixture
def damaged(dataset, tmp_path) -> tuple[Path, str]:
    """A copy of the dataset whose first shard has one undecodable image."""
    copy = copy_dataset(dataset, tmp_path / "ds")
    shard = sorted(copy.glob("train-*.tar"))[0]
    victim = sorted(_tar_keys(shard))[2]

    def corrupt(sample):
        if sample["__key__"] == victim:
            sample["jpg"] = sample["jpg"][:40]  # truncated JPEG
        return sample

    rewrite_shard(shard, corrupt)
    return copy, victim


def test_corrupt_sample_is_skipped_and_counted(damaged, caplog):
    copy, victim = damaged
    loader = make_loader(split_urls(copy, "train"), train=True, batch_size=8, image_size=16)
    batches = list(loader)
    valid = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    assert len(batches) == len(loader)
    assert victim not in valid and len(valid) == 119
    assert sum(int(b["corrupt"].sum()) for b in batches) == 1
    skipped = [reason for b in batches for reason in b["skipped"]]
    assert (
        len(skipped) == 1 and f"train-000000.tar member {victim}.jpg: cannot decode" in skipped[0]
    )
    assert any(victim in r.getMessage() for r in caplog.records)


def test_corrupt_sample_is_fatal_when_strict(damaged):
    copy, victim = damaged
    loader = make_loader(
        split_urls(copy, "train"), train=True, batch_size=8, image_size=16, strict=True
    )
    with pytest.raises(CorruptSampleError, match=rf"train-000000.tar member {victim}.jpg: cannot"):
        list(loader)


def test_fewer_shards_than_readers_is_a_clear_error(dataset):
    urls = split_urls(dataset, "train")[:3]
    with pytest.raises(DataError, match=r"3 shards cannot feed 2 ranks x 2 workers"):
        make_loader(urls, train=True, batch_size=8, num_workers=2, rank=0, world_size=2)


def test_shards_without_dataset_json_need_counts_or_resampling(dataset, tmp_path):
    lone = tmp_path / "train-000000.tar"
    lone.write_bytes(sorted(dataset.glob("train-*.tar"))[0].read_bytes())
    with pytest.raises(DataError, match=r"dataset.json.*shard_counts"):
        make_loader(str(lone), train=True, batch_size=4)
    loader = make_loader(
        str(lone), train=True, batch_size=4, channels=1, num_classes=3, shard_counts={str(lone): 7}
    )
    assert sum(int(b["valid"].sum()) for b in loader) == 7


def test_a_shard_that_disagrees_with_dataset_json_fails(dataset, tmp_path):
    lone = tmp_path / "train-000000.tar"
    lone.write_bytes(sorted(dataset.glob("train-*.tar"))[0].read_bytes())
    loader = make_loader(
        str(lone),
        train=True,
        batch_size=4,
        channels=1,
        num_classes=3,
        shard_counts={str(lone): 9},
        strict=True,
    )
    with pytest.raises(DataError, match=r"train-000000.tar holds 7 samples but its dataset.json"):
        list(loader)


def test_16_bit_scans_keep_their_contrast(tmp_path):
    """PIL alone would clip 16-bit pixels above 255 to white; the loader stretches them."""
    import numpy as np
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(4):
            ramp = np.add.outer(np.arange(32), np.arange(32) * (i + 1)) * 500
            Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "img" / name / f"{i}.png")
    out = prepare(
        PrepareConfig(
            source=str(tmp_path / "img"),
            out=str(tmp_path / "ds"),
            split=(1.0, 0, 0),
            progress=False,
        )
    )
    loader = make_loader(split_urls(out, "train"), train=False, batch_size=8, image_size=16)
    pixels = next(iter(loader))["image"]
    assert pixels.min() < -0.8 and pixels.max() > 0.8
    assert len(pixels.unique()) > 50


def _tail_loader(dataset: Path, mode: str, workers: int):
    """Rank 1 of 2 with batches of 4: 57 samples; 16 batches of which the last 1.75 are padding
    (0 or 1 worker), or workers of 28 + 28 samples in 9 + 8 batches (2 workers)."""
    return make_loader(
        split_urls(dataset, "train"),
        train=mode == "train",
        batch_size=4,
        image_size=16,
        num_workers=workers,
        rank=1,
        world_size=2,
        seed=5,
        shuffle_buffer=20,
    )


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys()
        assert a["key"] == b["key"] and a["skipped"] == b["skipped"], i
        for name in a.keys() - {"key", "skipped"}:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (i, name)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_starting_mid_epoch_yields_exactly_the_rest_of_a_full_pass(dataset, mode, workers):
    loader = _tail_loader(dataset, mode, workers)
    loader.set_epoch(1)
    full = list(loader)
    n = len(loader)
    assert len(full) == n == (17 if workers == 2 else 16)
    padded = [i for i, b in enumerate(full) if not b["valid"].all()]
    assert padded and (~full[-1]["valid"]).all()  # a batch of padding only, at the end
    starts = sorted({1, 2, n // 2, padded[0] - 1, padded[0], padded[0] + 1, n - 1, n})
    for start in starts:
        loader.set_epoch(1, start_batch=start)
        assert len(loader) == n
        _assert_same_batches(list(loader), full[start:])
        assert len(list(loader)) == n - start  # the start holds until the next set_epoch
    loader.set_epoch(1)
    _assert_same_batches(list(loader), full)
    with pytest.raises(ValueError, match="start_batch 18 is outside"):
        loader.set_epoch(1, start_batch=18)


def test_the_dataloader_takes_worker_batches_round_robin_passing_over_exhausted_ones(dataset):
    """3 shards of 7 for 2 workers in batches of 2: 7 batches from one, 4 from the other."""
    loader = make_loader(
        split_urls(dataset, "train")[:3], train=True, batch_size=2, image_size=8, num_workers=2
    )
    plan = loader.stream.plan()
    assert plan.batches == [7, 4]
    shard_keys = [set().union(*(_tar_keys(Path(u)) for u in urls)) for urls in plan.shards]
    full = list(loader)
    seen = [next(w for w, keys in enumerate(shard_keys) if b["key"][0] in keys) for b in full]
    assert seen == worker_order(plan.batches) == [0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0]
    assert worker_skips(plan.batches, 9) == ([5, 4], 0)
    assert worker_skips(plan.batches, 3) == ([2, 1], 1)
    for start in (3, 7, 8, 9, 10):
        loader.set_epoch(0, start_batch=start)
        _assert_same_batches(list(loader), full[start:])


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_workers_are_forked_by_a_single_threaded_server_that_ignores_the_stop_signals(dataset):
    """Forking the rank itself, which has threads, can hang a new worker inside `os.fork`
    (CPython before 3.11.8, gh-112275); and SLURM's TERM to every process of a step must not
    kill the server whose children the workers are."""
    loader = make_loader(split_urls(dataset, "train")[:4], train=True, batch_size=2, num_workers=2)
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in batches._workers]
    servers = {int(_status(pid)["PPid"]) for pid in workers}
    assert len(servers) == 1 and os.getpid() not in servers
    server = _status(servers.pop())
    assert server["Threads"].strip() == "1"
    ignored = int(server["SigIgn"], 16)
    for sig in stop_signal.STOP_SIGNALS:
        assert ignored & (1 << (sig - 1)), f"the server does not ignore {sig.name}"
    assert len(list(batches)) == len(loader) - 1


@pytest.mark.parametrize("workers", [0, 2])
def test_starting_mid_epoch_in_resampled_mode(dataset, workers):
    loader = make_loader(
        split_urls(dataset, "train"),
        train=True,
        batch_size=4,
        image_size=8,
        num_workers=workers,
        resampled=True,
        samples_per_epoch=50,
        seed=2,
    )
    full = list(loader)
    for start in (1, len(loader) // 2, len(loader) - 1):
        loader.set_epoch(0, start_batch=start)
        _assert_same_batches(list(loader), full[start:])


def test_skipped_batches_are_neither_decoded_nor_augmented(dataset, monkeypatch):
    decoded, collated = [], []

    def decode_sample(raw, *args):
        decoded.append(raw.key)
        return real_decode(raw, *args)

    def collate(samples, size, train):
        collated.append(len(samples))
        return real_collate(samples, size, train)

    real_decode, real_collate = data_module.decode_sample, data_module.collate
    monkeypatch.setattr(data_module, "decode_sample", decode_sample)
    monkeypatch.setattr(data_module, "collate", collate)
    loader = _tail_loader(dataset, "train", workers=0)
    full = list(loader)
    real, size, n = 57, 4, len(loader)
    assert len(decoded) == real and len(collated) == n == 16
    for start in (1, 8, 13, 14, 15, 16):
        decoded.clear()
        collated.clear()
        loader.set_epoch(0, start_batch=start)
        _assert_same_batches(list(loader), full[start:])
        unread = real - start * size  # real samples in the batches still to come
        # the padding copies the slot's last 4 real samples: those are decoded, skipped or not
        needs_tail = unread < size and start < n
        assert len(decoded) == (size if needs_tail else max(unread, 0))
        assert len(decoded) == len(set(decoded))
        assert collated == [size] * (n - start)


def test_data_dir_must_hold_a_dataset_json(dataset, tmp_path):
    assert resolve_data_dir(str(dataset), progress=False) == dataset
    with pytest.raises(DataError, match="holds no dataset.json; create it with `dtrain prepare`"):
        resolve_data_dir(str(tmp_path), progress=False)


def test_no_data_dir_means_the_embedded_set_prepared_by_rank_0(monkeypatch):
    from dtrain.prepare import data_folder

    calls = []
    monkeypatch.setattr(data_folder, "prepare", lambda config: calls.append(config))
    path = resolve_data_dir("", progress=False)
    assert path == Path("data/br35h_symmetric0.4_seed0")
    assert len(calls) == 1 and calls[0].progress is False and calls[0].source is None


def greedy_by_hand(counts: dict[str, int], slots: int, seed: int, epoch: int) -> list[list[str]]:
    """The assignment rule spelled out: largest shard first (a seeded shuffle among equals), to
    the emptiest slot, the lowest-numbered among equally empty ones."""
    import random

    urls = list(counts)
    random.Random(seed * 1_000_003 + epoch).shuffle(urls)
    urls.sort(key=lambda u: -counts[u])
    assigned, samples = [[] for _ in range(slots)], [0] * slots
    for url in urls:
        slot = min(range(slots), key=lambda s: (samples[s], s))
        assigned[slot].append(url)
        samples[slot] += counts[url]
    return assigned


@pytest.mark.parametrize("shards, ranks, workers", [(18, 2, 2), (300, 4, 3), (1000, 16, 8)])
def test_shards_go_largest_first_to_the_emptiest_slot(shards, ranks, workers):
    counts = {f"train-{i:06d}.tar": 1000 - (i * 37) % 23 for i in range(shards)}
    plan = plan_epoch(counts, ranks, workers, 64, seed=3, epoch=5, shuffle=True)
    assert plan.shards == greedy_by_hand(counts, ranks * workers, 3, 5)
    assert plan.samples == [sum(counts[u] for u in slot) for slot in plan.shards]


def test_the_epoch_is_planned_once_however_often_its_length_is_asked(dataset, monkeypatch):
    """The trainer asks for the loader's length at every log step; planning an epoch costs
    shards x log(readers) on every rank, so it is done once per epoch."""
    made = []

    def counting(*args, **kwargs):
        made.append(kwargs.get("epoch", args[5] if len(args) > 5 else None))
        return plan_epoch(*args, **kwargs)

    monkeypatch.setattr(data_module, "plan_epoch", counting)
    loader = make_loader(split_urls(dataset, "train"), train=True, batch_size=8, image_size=32)
    lengths = {len(loader) for _ in range(5)}  # make_loader planned epoch 0 to fail early
    loader.set_epoch(1)
    lengths |= {len(loader) for _ in range(5)}
    keys = set()
    for batch in loader:
        keys |= {k for k, real in zip(batch["key"], batch["valid"], strict=True) if real}
    assert made == [0, 1] and len(lengths) == 1
    assert keys == all_keys(dataset)

"""The mislabel ranking and its score accumulation, against values worked out by hand."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dtrain.train import label_scores as scores_module
from dtrain.train.label_scores import SCHEMA, ScoreAccumulator, loss_score
from dtrain.train.report import label_scores

NO_MANIFEST = Path("/nonexistent/dtrain-test/manifest.parquet")


def pair_auroc(scores: list[float], positives: list[bool]) -> float:
    """AUROC as the fraction of (positive, negative) pairs ordered right (ties count 1/2)."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def row(key, noisy, loss, attention=None, label=0, predicted=0, epochs=2) -> dict:
    """A row seen in `epochs` epochs with mean loss `loss` and mean attention `attention`
    (None: never scored by the attention)."""
    has = attention is not None
    return {
        "key": key,
        "label": label,
        "is_noisy": noisy,
        "predicted": predicted,
        "loss_sum": loss * epochs,
        "count": epochs,
        "attention_sum": (attention * epochs) if has else 0.0,
        "attention_count": epochs if has else 0,
    }


def as_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


# suspicion = 1 - attention: a 0.1, b 0.8, c 0.4, d 0.6 -> b, d, c, a
# noisy b (0.8), c (0.4) vs clean a (0.1), d (0.6): b>a, b>d, c>a, c<d -> 3/4
# loss: noisy b 2.0, c 0.3 vs clean a 0.5, d 1.0: b>a, b>d, c<a, c<d -> 2/4
TINY = [
    row("a", False, 0.5, 0.9),
    row("b", True, 2.0, 0.2),
    row("c", True, 0.3, 0.6),
    row("d", False, 1.0, 0.4),
]


def test_label_scores_rank_low_attention_first_and_aurocs_by_hand():
    out, aurocs = label_scores(as_table(TINY), NO_MANIFEST)
    out = out.to_pylist()
    assert [r["key"] for r in out] == ["b", "d", "c", "a"]
    assert [r["rank"] for r in out] == [1, 2, 3, 4]
    by_key = {r["key"]: r for r in out}
    for key, suspicion in {"a": 0.1, "b": 0.8, "c": 0.4, "d": 0.6}.items():
        assert by_key[key]["score"] == pytest.approx(suspicion)
        assert by_key[key]["attention_score"] == pytest.approx(1 - suspicion)
        assert by_key[key]["source"] == ""  # no manifest: no sources
    assert set(aurocs) == {"loss", "attention"}
    assert aurocs["attention"] == pytest.approx(0.75)
    assert aurocs["loss"] == pytest.approx(0.5)
    # the plain-Python pair count agrees
    assert aurocs["attention"] == pytest.approx(
        pair_auroc([0.1, 0.8, 0.4, 0.6], [False, True, True, False])
    )


def test_label_scores_without_attention_rank_by_loss_high_first():
    rows = [row(r["key"], r["is_noisy"], r["loss_sum"] / 2) for r in TINY]  # no attention
    out, aurocs = label_scores(as_table(rows), NO_MANIFEST)
    out = out.to_pylist()
    assert [r["key"] for r in out] == ["b", "d", "a", "c"]  # losses 2.0, 1.0, 0.5, 0.3
    assert [r["rank"] for r in out] == [1, 2, 3, 4]
    assert [r["score"] for r in out] == pytest.approx([2.0, 1.0, 0.5, 0.3])
    assert all(math.isnan(r["attention_score"]) for r in out)
    assert set(aurocs) == {"loss"}
    assert aurocs["loss"] == pytest.approx(0.5)


def test_label_scores_planted_noise_is_found():
    """20 of 100 labels wrong, with low attention and high loss: both AUROCs are high."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(100):
        noisy = i % 5 == 0
        attention = rng.uniform(0.05, 0.45) if noisy else rng.uniform(0.35, 0.95)
        loss = rng.uniform(1.0, 3.0) if noisy else rng.uniform(0.05, 1.2)
        rows.append(row(f"k{i:03d}", noisy, float(loss), float(attention)))
    out, aurocs = label_scores(as_table(rows), NO_MANIFEST)
    out = out.to_pylist()
    assert aurocs["attention"] > 0.9 and aurocs["loss"] > 0.9
    noisy = [r["is_noisy"] for r in rows]
    assert aurocs["attention"] == pytest.approx(
        pair_auroc([1 - r["attention_sum"] / 2 for r in rows], noisy)
    )
    assert aurocs["loss"] == pytest.approx(pair_auroc([r["loss_sum"] / 2 for r in rows], noisy))
    assert [r["rank"] for r in out] == list(range(1, 101))
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)
    assert sum(r["is_noisy"] for r in out[:20]) >= 15  # the planted ones lead


def test_label_scores_unscored_attention_rows_rank_last(tmp_path):
    """Rows the attention never scored (attention_count 0, NaN attention) among scored ones: they
    rank after every scored row, the attention AUROC counts only the scored rows, the loss AUROC
    counts all; the manifest gives each key its source."""
    unscored = [row("e", True, 9.0), row("f", False, 0.1)]  # e has the highest loss of all
    rows = as_table([*TINY, *unscored])
    manifest = tmp_path / "manifest.parquet"
    keys = ["a", "b", "c", "d", "e", "f", "other"]
    pq.write_table(pa.table({"key": keys, "source": [f"img/{k}.png" for k in keys]}), manifest)
    out, aurocs = label_scores(rows, manifest)
    out = out.to_pylist()
    assert [r["key"] for r in out[:4]] == ["b", "d", "c", "a"]
    assert {r["key"] for r in out[4:]} == {"e", "f"}
    assert all(math.isnan(r["score"]) for r in out[4:])
    assert [r["rank"] for r in out] == [1, 2, 3, 4, 5, 6]
    assert aurocs["attention"] == pytest.approx(0.75)  # as without e and f
    # noisy b 2.0, c 0.3, e 9.0 vs clean a 0.5, d 1.0, f 0.1: b 3 wins, c 1 win, e 3 wins -> 7/9
    assert aurocs["loss"] == pytest.approx(7 / 9)
    assert {r["key"]: r["source"] for r in out} == {k: f"img/{k}.png" for k in "abcdef"}


def add_batches(acc: ScoreAccumulator) -> None:
    # batch 1: no attention (warm-up); the padding row repeats key "a" with absurd values
    acc.add(
        ["a", "b", "c", "a"],
        torch.tensor([True, True, True, False]),
        torch.tensor([0, 1, 1, 0]),  # label
        torch.tensor([0, 0, 1, 1]),  # clean label: b is noisy
        torch.tensor([0.5, 1.0, 2.0, 100.0]),
        torch.tensor([0, 1, 1, 2]),
        None,
    )
    # batch 2: with attention; the padding row has its own key
    acc.add(
        ["b", "c", "d", "pad"],
        torch.tensor([True, True, True, False]),
        torch.tensor([1, 1, 0, 0]),
        torch.tensor([0, 1, 0, 0]),
        torch.tensor([0.25, 0.75, 1.5, 50.0]),
        torch.tensor([0, 1, 0, 2]),
        torch.tensor([0.5, 0.25, 0.75, 0.125]),
    )


def scored(key, label, noisy, predicted, loss_sum, count, attention_sum, attention_count) -> dict:
    return dict(
        zip(
            SCHEMA.names,
            (key, label, noisy, predicted, loss_sum, count, attention_sum, attention_count),
            strict=True,
        )
    )


EXPECTED_ROWS = [  # in the order the samples were first seen
    scored("a", 0, False, 0, 0.5, 1, 0.0, 0),
    scored("b", 1, True, 0, 1.25, 2, 0.5, 1),  # predicted: the last one (0)
    scored("c", 1, False, 1, 2.75, 2, 0.25, 1),
    scored("d", 0, False, 0, 1.5, 1, 0.75, 1),
]


def test_score_accumulator_sums_counts_and_skips_padding():
    acc = ScoreAccumulator()
    add_batches(acc)
    assert acc.table.num_rows == 0  # nothing merged yet
    acc.merge()
    assert acc.table.to_pylist() == EXPECTED_ROWS
    assert loss_score(acc.table)[1] == 0.625
    assert scores_module.attention_score(acc.table)[1] == 0.5
    assert math.isnan(scores_module.attention_score(acc.table)[0])
    # a second merge adds to the first
    add_batches(acc)
    acc.merge()
    b = acc.table.to_pylist()[1]
    assert b["key"] == "b" and b["loss_sum"] == 2.5 and b["count"] == 4
    assert b["attention_count"] == 2 and acc.table.to_pylist()[0]["count"] == 2
    assert "pad" not in acc.table.column("key").to_pylist()


def test_score_accumulator_leaves_out_the_samples_of_a_skipped_step():
    """A non-finite step is skipped; its samples' losses are no evidence and would make every
    later score (and the report's AUROC) NaN."""
    acc = ScoreAccumulator()
    add_batches(acc)
    acc.add(
        ["a", "b"],
        torch.tensor([True, True]),
        torch.tensor([0, 1]),
        torch.tensor([0, 0]),
        torch.tensor([float("nan"), 1.0]),
        torch.tensor([0, 1]),
        torch.tensor([0.5, float("inf")]),
    )
    acc.merge()
    assert acc.table.to_pylist() == EXPECTED_ROWS


def test_score_accumulator_state_round_trip(tmp_path):
    acc = ScoreAccumulator()
    add_batches(acc)
    acc.merge()
    again = ScoreAccumulator()
    again.load_state_dict(acc.state_dict())
    assert again.table.to_pylist() == EXPECTED_ROWS
    path = tmp_path / "scores.pt"
    torch.save(acc.state_dict(), path)
    loaded = ScoreAccumulator()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    assert loaded.table.to_pylist() == EXPECTED_ROWS  # order kept
    # an empty accumulator round-trips too
    torch.save(ScoreAccumulator().state_dict(), path)
    empty = ScoreAccumulator()
    empty.load_state_dict(torch.load(path, weights_only=True))
    assert empty.table.num_rows == 0


class TwoRanks:
    """torch.distributed as seen by one of two ranks, whose peer sent `peer_rows`: enough for
    `ScoreAccumulator.merge` (gather_object to rank 0)."""

    def __init__(self, rank: int, peer_rows: pa.Table) -> None:
        self.rank, self.peer_rows, self.sent = rank, peer_rows, []

    def world(self) -> tuple[int, int]:
        return self.rank, 2

    def gather_object(self, obj, object_gather_list=None, dst=0):
        self.sent.append((obj, dst))
        if self.rank == dst:
            object_gather_list[:] = [obj, self.peer_rows] if dst == 0 else [self.peer_rows, obj]


def test_only_rank_0_keeps_the_score_rows(monkeypatch):
    """Keys move between ranks from epoch to epoch, so one rank must see them all; the others
    hand over what they scored at each save and keep no row per sample (a table on every rank
    grows with the dataset, on every GPU of every node)."""
    peer = ScoreAccumulator()
    add_batches(peer)
    peer.flush()
    peer_rows = peer._local[0]
    for rank in (0, 1):
        fake = TwoRanks(rank, peer_rows)
        monkeypatch.setattr(scores_module, "world", fake.world)
        monkeypatch.setattr(scores_module.dist, "gather_object", fake.gather_object, raising=False)
        acc = ScoreAccumulator()
        add_batches(acc)
        acc.merge()
        assert [dst for _, dst in fake.sent] == [0]
        assert fake.sent[0][0].num_rows == 6  # its own real samples, handed to rank 0
        if rank == 0:  # both ranks' rows: every count doubled
            assert acc.table.column("count").to_pylist() == [2, 4, 4, 2]
        else:
            assert acc.table.num_rows == 0 and acc._local == []
            acc.load_state_dict(peer.state_dict())  # a resume: rank 0 alone takes the rows
            assert acc.table.num_rows == 0


def test_scores_of_many_samples_are_columns_not_python_objects():
    """50k samples scored twice, merged and ranked: the Python heap grows by far less than an
    object per sample would take (a dict or dataclass per row is several hundred bytes)."""
    n, batch = 50_000, 1000
    acc = ScoreAccumulator()
    keys = [f"s{i:07d}" for i in range(n)]
    labels = torch.arange(n) % 2
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2):
            for at in range(0, n, batch):
                part = slice(at, at + batch)
                acc.add(
                    keys[part],
                    torch.ones(batch, dtype=torch.bool),
                    labels[part],
                    labels[part],
                    torch.rand(batch),
                    1 - labels[part],
                    None,
                )
            acc.merge()
        ranked, _ = label_scores(acc.table, NO_MANIFEST)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert ranked.num_rows == n and ranked.column("rank").to_pylist()[-1] == n
    assert peak / n < 150, f"{peak / n:.0f} bytes of Python heap per sample"

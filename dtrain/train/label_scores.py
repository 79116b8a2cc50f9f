"""Per-sample mislabel scores, accumulated over the last `method.score_epochs` epochs: the
attention weight (where the method has one) and the per-sample training loss.

Steps hand over device tensors; they are read back only when the loop flushes (on log steps),
into Arrow columns (no Python object per sample: a million samples take about 60 MB), and
gathered to rank 0 only when a checkpoint is written. Keys move between ranks from epoch to
epoch, so one rank merges them all: rank 0, which writes the checkpoints and the report; every
other rank holds only its records since the last save, whatever the dataset's size."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from dtrain.distributed import world

# one row per training sample scored so far
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int64()),  # the label training sees (noisy where noise was injected)
        ("is_noisy", pa.bool_()),  # label differs from the clean one `dtrain prepare` kept
        ("predicted", pa.int64()),  # the model's last prediction on it
        ("loss_sum", pa.float64()),
        ("count", pa.int64()),
        ("attention_sum", pa.float64()),
        ("attention_count", pa.int64()),  # epochs in which the attention was trained
    ]
)
# how merging combines a sample's rows: its first label, its last prediction, summed evidence
MERGE = {
    "label": "first",
    "is_noisy": "first",
    "predicted": "last",
    "loss_sum": "sum",
    "count": "sum",
    "attention_sum": "sum",
    "attention_count": "sum",
}


def mean_score(scores: pa.Table, total: str, count: str) -> np.ndarray:
    """`total / count` per row; NaN where the count is 0 (never scored that way)."""
    sums = scores.column(total).to_numpy()
    counts = scores.column(count).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def loss_score(scores: pa.Table) -> np.ndarray:
    return mean_score(scores, "loss_sum", "count")


def attention_score(scores: pa.Table) -> np.ndarray:
    return mean_score(scores, "attention_sum", "attention_count")


def merge_rows(tables: list[pa.Table]) -> pa.Table:
    """One row per key, in order of first appearance (MERGE; `last` is the last in order)."""
    combined = pa.concat_tables(tables)
    grouped = combined.group_by("key", use_threads=False).aggregate(
        [(name, how) for name, how in MERGE.items()]
    )
    columns = [grouped.column("key")] + [grouped.column(f"{n}_{h}") for n, h in MERGE.items()]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


class ScoreAccumulator:
    """Per-sample score rows of this run (`table`, on rank 0), see the module docstring."""

    def __init__(self) -> None:
        self.table = SCHEMA.empty_table()
        self._pending: list[tuple[list[str], torch.Tensor]] = []  # on the device
        self._local: list[pa.Table] = []  # read back, not yet merged

    def add(
        self,
        keys: list[str],
        valid: torch.Tensor,
        label: torch.Tensor,
        clean_label: torch.Tensor,
        sample_loss: torch.Tensor,
        predicted: torch.Tensor,
        attention: torch.Tensor | None,
    ) -> None:
        """One batch, as device tensors: no read-back here."""
        has_attention = attention is not None
        columns = torch.stack(
            [
                valid.float(),
                label.float(),
                (label != clean_label).float(),
                predicted.float(),
                sample_loss.float(),
                attention.float() if has_attention else torch.zeros_like(sample_loss).float(),
                torch.full_like(sample_loss, float(has_attention)).float(),
            ],
            dim=1,
        )
        self._pending.append((keys, columns.detach()))

    def flush(self) -> None:
        """Read the pending batches back to the host (one transfer) as rows of real samples; a
        sample of a skipped (non-finite) step is left out: no evidence either way."""
        if not self._pending:
            return
        values = torch.cat([c for _, c in self._pending]).cpu().double().numpy()
        keys = pa.array([k for batch_keys, _ in self._pending for k in batch_keys], pa.string())
        self._pending = []
        valid, label, noisy, predicted, loss, attention, has_attention = values.T
        keep = (valid > 0) & np.isfinite(loss) & np.isfinite(attention)
        rows = {
            "key": keys.filter(pa.array(keep)),
            "label": label[keep].astype(np.int64),
            "is_noisy": noisy[keep] > 0,
            "predicted": predicted[keep].astype(np.int64),
            "loss_sum": loss[keep],
            "count": np.ones(int(keep.sum()), np.int64),
            "attention_sum": attention[keep],
            "attention_count": has_attention[keep].astype(np.int64),
        }
        self._local.append(pa.table(rows, schema=SCHEMA))

    def merge(self) -> None:
        """Collective: every rank's new rows into rank 0's `table`."""
        self.flush()
        local = pa.concat_tables([SCHEMA.empty_table(), *self._local])
        self._local = []
        rank, size = world()
        parts = [local]
        if size > 1:
            parts = [None] * size if rank == 0 else None
            dist.gather_object(local, parts, dst=0)
            if rank != 0:
                return
        if any(part.num_rows for part in parts):
            self.table = merge_rows([self.table, *parts])

    def state_dict(self) -> dict:
        """Columns of plain values and tensors: loadable with weights_only=True."""
        t = self.table
        ints = [t.column(c).to_numpy() for c in ("label", "is_noisy", "predicted", "count")]
        ints.append(t.column("attention_count").to_numpy())
        sums = [t.column(c).to_numpy() for c in ("loss_sum", "attention_sum")]
        return {
            "keys": t.column("key").to_pylist(),
            "ints": torch.from_numpy(np.stack(ints, 1).astype(np.int64)).reshape(-1, 5),
            "sums": torch.from_numpy(np.stack(sums, 1).astype(np.float64)).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 takes the saved rows; the others keep none (see the module docstring)."""
        if world()[0] != 0:
            return
        ints, sums = state["ints"].numpy(), state["sums"].numpy()
        rows = {
            "key": pa.array(state["keys"], pa.string()),
            "label": ints[:, 0],
            "is_noisy": ints[:, 1] > 0,
            "predicted": ints[:, 2],
            "loss_sum": sums[:, 0],
            "count": ints[:, 3],
            "attention_sum": sums[:, 1],
            "attention_count": ints[:, 4],
        }
        self.table = pa.table(rows, schema=SCHEMA)

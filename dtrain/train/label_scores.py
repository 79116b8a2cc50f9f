"""Per-sample mislabel scores, accumulated over the last `method.score_epochs` epochs: the
attention weight (where the method has one) and the per-sample training loss.

Steps hand over device tensors; they are read back only when the loop flushes (on log steps),
and merged over ranks only when a checkpoint is written (keys move between ranks from epoch to
epoch, so every rank keeps the full table)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dtrain.distributed import world


@dataclass
class ScoreRow:
    """One training sample's scores so far."""

    key: str
    label: int  # the label training sees (noisy where noise was injected)
    is_noisy: bool  # label differs from the clean one `dtrain prepare` kept
    predicted: int  # the model's last prediction on it
    loss_sum: float = 0.0
    count: int = 0
    attention_sum: float = 0.0
    attention_count: int = 0  # epochs in which the attention was trained (after warm-up)

    @property
    def loss_score(self) -> float:
        return self.loss_sum / self.count if self.count else math.nan

    @property
    def attention_score(self) -> float:
        return self.attention_sum / self.attention_count if self.attention_count else math.nan


class ScoreAccumulator:
    """Per-sample score rows of this run, keyed by sample key (see the module docstring)."""

    def __init__(self) -> None:
        self.rows: dict[str, ScoreRow] = {}
        self._pending: list[tuple[list[str], torch.Tensor]] = []  # on the device
        self._local: list[tuple] = []  # read back, not yet merged over ranks

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
        """Read the pending batches back to the host (one transfer)."""
        if not self._pending:
            return
        values = torch.cat([c for _, c in self._pending]).cpu().tolist()
        keys = [k for batch_keys, _ in self._pending for k in batch_keys]
        self._pending = []
        for key, (valid, *rest) in zip(keys, values, strict=True):
            if valid:
                self._local.append((key, *rest))

    def merge(self) -> None:
        """Collective: every rank's new records into `rows` on every rank."""
        self.flush()
        _, size = world()
        parts = [self._local]
        if size > 1:
            parts = [None] * size
            dist.all_gather_object(parts, self._local)
        self._local = []
        for records in parts:
            for key, label, noisy, predicted, loss, attention, has_attention in records:
                if not (math.isfinite(loss) and math.isfinite(attention)):
                    continue  # a sample of a skipped (non-finite) step: no evidence either way
                row = self.rows.get(key)
                if row is None:
                    row = self.rows[key] = ScoreRow(key, int(label), bool(noisy), int(predicted))
                row.predicted = int(predicted)
                row.loss_sum += loss
                row.count += 1
                row.attention_sum += attention
                row.attention_count += int(has_attention)

    def state_dict(self) -> dict:
        """Columns of plain values and tensors: loadable with weights_only=True."""
        rows = list(self.rows.values())
        return {
            "keys": [r.key for r in rows],
            "ints": torch.tensor(
                [[r.label, r.is_noisy, r.predicted, r.count, r.attention_count] for r in rows],
                dtype=torch.int64,
            ).reshape(-1, 5),
            "sums": torch.tensor(
                [[r.loss_sum, r.attention_sum] for r in rows], dtype=torch.float64
            ).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rows = {}
        for key, ints, sums in zip(
            state["keys"], state["ints"].tolist(), state["sums"].tolist(), strict=True
        ):
            label, noisy, predicted, count, attention_count = ints
            self.rows[key] = ScoreRow(
                key, label, bool(noisy), predicted, sums[0], count, sums[1], attention_count
            )

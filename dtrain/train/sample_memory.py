"""The per-sample memory of the methods that keep one (ELR's targets, DivideMix's division:
dtrain.methods.memory.MemoryRule), by sample key.

A row changes only at an epoch's end, from what the steps handed back for that sample during the
epoch; a step reads the rows as they were at the epoch's start. So the order in which ranks see
samples does not matter, a mid-epoch checkpoint holds what was handed back so far, and a resumed
run reads the same rows as an uninterrupted one. Reading a batch's rows is a host lookup before
the batch moves; what the steps hand back stays on the device until a save or the epoch's end
(one transfer), like the label scores."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dtrain.distributed import world
from dtrain.methods.memory import MemoryRule


class SampleMemory:
    def __init__(self, rule: MemoryRule) -> None:
        self.rule = rule
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.rows = torch.empty(0, rule.width)
        self.seen: dict[str, torch.Tensor] = {}  # this epoch's hand-backs, merged across ranks
        self._local: list[tuple[str, list[float]]] = []
        self._pending: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []

    def lookup(self, keys: list[str], device: torch.device) -> torch.Tensor:
        """The rows of a batch's samples as at the epoch's start (`initial` for a new one)."""
        out = self._initial(len(keys))
        found = [(i, self.index[k]) for i, k in enumerate(keys) if k in self.index]
        if found:
            at, rows = zip(*found, strict=True)
            out[list(at)] = self.rows[list(rows)]
        return out.to(device, non_blocking=True)

    def _initial(self, rows: int) -> torch.Tensor:
        return torch.tensor(self.rule.initial).expand(rows, self.rule.width).clone()

    def add(self, keys: list[str], valid: torch.Tensor, handed_back: torch.Tensor) -> None:
        """One batch's hand-backs, as device tensors: no read-back here."""
        self._pending.append((keys, valid.detach(), handed_back.detach().float()))

    def merge(self) -> None:
        """Collective: every rank's hand-backs so far into `seen` on every rank. A sample of a
        skipped (non-finite) step hands back nothing."""
        local = self._local
        if self._pending:
            valid = torch.cat([v for _, v, _ in self._pending]).cpu().tolist()
            values = torch.cat([h for _, _, h in self._pending]).cpu()
            keys = [k for batch_keys, _, _ in self._pending for k in batch_keys]
            self._pending = []
            finite = torch.isfinite(values).all(1).tolist()
            for key, ok, good, row in zip(keys, valid, finite, values.tolist(), strict=True):
                if ok and good:
                    local.append((key, row))
        self._local = []
        parts = [local]
        _, size = world()
        if size > 1:
            parts = [None] * size
            dist.all_gather_object(parts, local)
        for records in parts:
            for key, row in records:
                self.seen[key] = torch.tensor(row)

    def end_epoch(self) -> None:
        """Collective: the rows of the samples seen this epoch become the rule's update."""
        self.merge()
        if not self.seen:
            return
        new = [k for k in self.seen if k not in self.index]
        for key in new:
            self.index[key] = len(self.keys)
            self.keys.append(key)
        grown = self._initial(len(new))
        self.rows = torch.cat([self.rows, grown])
        at = [self.index[k] for k in self.seen]
        self.rows[at] = self.rule.end_epoch(self.rows[at], torch.stack(list(self.seen.values())))
        self.seen = {}

    def state_dict(self) -> dict:
        """Keys and tensors only: loadable with weights_only=True. Call after `merge`."""
        seen = list(self.seen)
        return {
            "keys": list(self.keys),
            "rows": self.rows.clone(),
            "seen_keys": seen,
            "seen_rows": torch.stack([self.seen[k] for k in seen])
            if seen
            else torch.empty(0, self.rule.width),
        }

    def load_state_dict(self, state: dict) -> None:
        self.keys = list(state["keys"])
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.rows = state["rows"].float()
        self.seen = dict(zip(state["seen_keys"], state["seen_rows"].float(), strict=True))

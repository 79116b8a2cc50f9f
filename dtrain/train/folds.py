"""Cross-fitting folds (train.refine_folds): a clean-up round trains one model per fold with that
fold's labels hidden, and judges each sample's label by the model that never saw it, so a label
the network memorised cannot vouch for itself."""

from __future__ import annotations

import zlib

import torch


def sample_folds(groups: torch.Tensor, keys: list[str], folds: int) -> torch.Tensor:
    """Each sample's fold in 0..folds-1, on the groups' device (nothing is read back): its
    near-duplicate group's, so copies of one scan share a fold and none is judged by a model
    that learned its copy's label; its key's (CRC-32) where the shards record no group (-1)."""
    by_key = torch.tensor(
        [zlib.crc32(key.encode()) for key in keys], dtype=torch.int64, device=groups.device
    )
    return torch.where(groups >= 0, groups.to(torch.int64), by_key) % folds

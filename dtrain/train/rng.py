"""The random generators a training step draws from: seeded per rank, and saved and restored
per rank so that a resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import random

import numpy as np
import torch

from dtrain.distributed import world


def rng_state() -> dict:
    """Every random generator a training step draws from, as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states_of_all_ranks() -> list[dict]:
    """Collective: every rank's generators, in rank order (each rank draws its own groups,
    mixup priors and augmentations, so each must resume its own)."""
    rank, size = world()
    if size == 1:
        return [rng_state()]
    states: list = [None] * size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

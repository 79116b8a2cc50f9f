"""Which dataset folder a run trains on: the user's (`data.path`, which must hold a
`dataset.json`), or, with no path, the embedded Br35H set, prepared on first use (and again
when a newer dtrain prepares it differently)."""

from __future__ import annotations

from pathlib import Path

import torch

from dtrain.distributed import world
from dtrain.errors import DataError
from dtrain.prepare.pipeline import prepare
from dtrain.prepare.prepare_config import PrepareConfig, default_out
from dtrain.prepare.sources import from_embedded


def resolve_data_dir(path: str, progress: bool) -> Path:
    """The dataset folder `path`, which must hold a `dataset.json`; or, when `path` is empty, the
    embedded Br35H set, prepared by rank 0 if missing while the other ranks wait for it."""
    if path:
        folder = Path(path)
        if not (folder / "dataset.json").is_file():
            raise DataError(
                f"data.path={folder} holds no dataset.json; create it with `dtrain prepare` "
                "(or `dtrain index` for shards of your own)"
            )
        return folder
    # the embedded set's folder is dtrain's own cache: one an older dtrain built is rebuilt
    prep = PrepareConfig(progress=progress, overwrite=True)
    folder = default_out(prep, from_embedded())
    rank, size = world()
    if rank == 0:
        prepare(prep)  # a no-op when the folder already holds this exact dataset
    if size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return folder

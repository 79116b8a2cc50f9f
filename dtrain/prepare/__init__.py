"""`dtrain prepare`: a labelled image source becomes `{train,val,test}-%06d.tar` WebDataset shards
with the clean label kept beside the noisy one, a `manifest.parquet` and a `dataset.json`.

`config` says what is asked, `pipeline` runs it; `sources`, `dedup`, `split`, `noise`, `shards`,
`records` and `folder` each do one step; `cli` is the command line generated from the config.
"""

from __future__ import annotations

from dtrain.prepare.pipeline import prepare
from dtrain.prepare.prepare_config import PrepareConfig, default_out

__all__ = ["PrepareConfig", "default_out", "prepare"]

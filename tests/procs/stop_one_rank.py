"""A stop requested on rank 1 only, in its step callback on a log step (where a signal handler
could also run): every rank must stop at the same, agreed step. Run under torchrun; each rank
prints its fit() result as one JSON line."""

import json
import os
import sys

from dtrain.config import load_config
from dtrain.train.resolve import resolve
from dtrain.train.trainer import Trainer

if __name__ == "__main__":
    at_step, overrides = int(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])

    def on_step(info) -> None:
        if rank == 1 and info.step == at_step:
            trainer.request_stop()

    trainer = Trainer(resolve(load_config(None, overrides)), on_step=on_step)
    # one write that starts its own line: the two ranks share torchrun's stdout, and a result
    # appended to the other rank's unfinished line could not be read back
    sys.stdout.write("\nRESULT " + json.dumps({"rank": rank, **trainer.fit()}) + "\n")
    sys.stdout.flush()

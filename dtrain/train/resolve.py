"""A config resolved once, before anything is built: the processes this job has (SLURM's
variables read), the precision, the DeepSpeed file reconciled with the dtrain config (its
"auto" values filled, its own values taken where the user set none), then validated. What
comes out is what runs and what `config.yaml` records; nothing changes it afterwards."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from dtrain.config import Config
from dtrain.launch import slurm_env
from dtrain.train.deepspeed_config import ResolvedDeepSpeed, resolve_deepspeed_config


@dataclass(frozen=True)
class ResolvedRun:
    """The config as it runs; `precision` "bf16" or "fp32"; `deepspeed` the DeepSpeed config
    to initialise with, or None for Accelerate."""

    config: Config
    precision: str
    deepspeed: ResolvedDeepSpeed | None = None

    def with_run_dir(self, run_dir: str) -> ResolvedRun:
        """The same run in another folder (a clean-up round's)."""
        config = copy.deepcopy(self.config)
        config.train.run_dir = run_dir
        return ResolvedRun(config, self.precision, self.deepspeed)


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    cuda = torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def resolve(config: Config) -> ResolvedRun:
    """Validate `config` and resolve what depends on the job (a copy: `config` is untouched)."""
    config = copy.deepcopy(config)
    config.validate()  # a bad key is refused before any file is read or a process group made
    slurm_env.env_from_slurm()  # srun without a launcher: RANK, WORLD_SIZE from SLURM
    precision = resolve_precision(config.train.precision)
    deepspeed = None
    if config.train.deepspeed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        deepspeed, config = resolve_deepspeed_config(
            config.train.deepspeed, config, precision, world
        )
        precision = "bf16" if deepspeed.config["bf16"]["enabled"] else "fp32"
        config.validate()  # the values the DeepSpeed file decided
    return ResolvedRun(config, precision, deepspeed)

"""Process-group plumbing: rank and world from the launcher or from SLURM, a preflight that fails
fast and readably, a roll call that names a rank whose process died, an all-gather that keeps
gradients (for contrastive negatives over the global batch) and rank 0's result handed to every
rank."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from dtrain.errors import DistributedError

T = TypeVar("T")


def silence_understood_warnings() -> None:
    """FutureWarnings that every rank would print at every start, about choices made on
    purpose or not ours: Accelerate's on `broadcast_buffers=False` (its replacement still syncs
    the buffers at init, which the warning itself says to avoid while that matters), torch's on
    `torch.distributed.nn.functional.all_gather`, the one differentiable all-gather outside
    private API (`all_gather_with_grad`), and torch's on the `all_gather_into_tensor` that
    DeepSpeed's ZeRO calls."""
    for message in (
        r"`broadcast_buffers` is deprecated",
        r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def env_for_one_process() -> bool:
    """Started with no launcher (a plain `dtrain train`): the variables of a one-process group on
    this host, for DeepSpeed, which needs a process group even alone (and without them looks for
    MPI). A free port, so that two such runs on one host do not collide. Returns whether it did."""
    env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return False
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        with socket.socket() as s:
            s.bind(("", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    return True


def rendezvous() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def preflight(device: torch.device) -> None:
    """A one-element all-reduce across all ranks before any work, so that a rank that cannot
    talk to the others fails now with a message that says which rank and which address."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    probe = torch.ones(1, device=device)
    try:
        dist.all_reduce(probe)
    except Exception as err:  # gloo and nccl raise different types
        raise DistributedError(
            f"preflight: rank {rank} of {world} on {socket.gethostname()} could not all-reduce "
            f"with the other ranks through {rendezvous()} ({err}); check that every rank was "
            "started and that all nodes can reach that address and port"
        ) from err
    if int(probe.item()) != world:
        raise DistributedError(
            f"preflight: rank {rank} summed {probe.item()} over {world} ranks; "
            "the ranks disagree on the world size"
        )
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    _store().set(f"dtrain/rank/{rank}", f"pid {os.getpid()} on {node}")
    print(f"rank {rank} of {world} on node {node}: joined through {rendezvous()}", flush=True)


ROLL_CALL_SECONDS = 5.0  # how long survivors wait for each other after a collective failed
# how gloo and NCCL word a peer that went away (torch raises a plain RuntimeError for these)
PEER_LOSS = ("Connection reset", "Connection closed", "Broken pipe", "Connection refused", "NCCL")


def _store() -> dist.Store:
    """The rendezvous key-value store (torchrun's agent or rank 0 hosts it): it outlives a
    rank's process, so the survivors can find out which ranks are gone."""
    return dist.distributed_c10d._get_default_store()


def lost_ranks(wait_s: float = ROLL_CALL_SECONDS) -> list[str]:
    """Collective among the survivors of a failed collective: each checks in, then waits up to
    `wait_s` for the others; the ranks that never do are lost, described by pid and node."""
    rank, size = world()
    try:
        store = _store()
        store.set(f"dtrain/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(size) if not store.check([f"dtrain/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return [f"rank {r} ({store.get(f'dtrain/rank/{r}').decode()})" for r in missing]
    except Exception:  # the store itself is gone: its host, rank 0 under srun, died
        return [f"rank 0 (it hosted the rendezvous store at {rendezvous()})"]


@contextlib.contextmanager
def naming_lost_ranks(advice: str) -> Iterator[None]:
    """A collective that fails because another rank's process died (gloo: "Connection reset
    by peer") becomes, on every survivor and within seconds, a DistributedError naming the
    lost ranks, instead of a backend traceback or a hang until the timeout."""
    try:
        yield
    except RuntimeError as err:
        peer_loss = isinstance(err, dist.DistError) or any(p in str(err) for p in PEER_LOSS)
        if world()[1] == 1 or isinstance(err, DistributedError) or not peer_loss:
            raise
        lost = lost_ranks()
        if not lost:
            raise
        # gloo's "[.../pair.cc:545] Read error [addr]: Connection reset by peer. This is ..."
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(err).splitlines()[0]).split(". This is")[0]
        raise DistributedError(
            f"rank {world()[0]} lost {', '.join(lost)}: its process stopped answering in the "
            f"middle of the run ({detail[:160]}); {advice}"
        ) from err


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank_0(value: T) -> T:
    """Rank 0's `value` on every rank (pickled: for what only rank 0 computes, once)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of `x` from every rank, in rank order; gradients flow back to each rank's
    own slice (torch.distributed.nn's differentiable all_gather)."""
    rank, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank."""
    rank, size = world()
    if size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (nothing to do in one process); no read-back."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks, in rank order, of same-shaped tensors (no gradient)."""
    size = world()[1]
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)

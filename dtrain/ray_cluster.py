"""Ray for dtrain's cluster work (`dtrain tune`, `dtrain prepare --engine ray`): join a running
cluster, or start a private local one."""

from __future__ import annotations

import os

from dtrain.errors import DtrainError


def start_ray(address: str, object_store_mb: int, num_cpus: int | None = None) -> None:
    """Join `address` (a cluster started by `ray start`, e.g. inside a SLURM allocation), or
    start a private local Ray with a small object store (trials pass no data through it,
    prepare's workers only fingerprints and checksums) on `num_cpus` cores (default: all).
    Private: `address="local"`, as Ray's own default joins whatever cluster its address file
    (left by any earlier `ray start` here, maybe long gone) or RAY_ADDRESS names. A local head
    needs no token: RAY_AUTH_MODE=disabled unless the user set it. A Ray that does not start
    is the user's to fix: one line, no traceback."""
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",
            object_store_memory=object_store_mb * 2**20,
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,  # trials log to their own files; workers raise their errors
        )
    except Exception as err:  # Ray raises plain ValueError, ConnectionError, RuntimeError...
        ray.shutdown()
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if address:
            raise DtrainError(
                f"cannot join the Ray cluster at --address={address} ({reason}); start it "
                "first (`ray start --head`) or drop --address for a private local Ray"
            ) from err
        raise DtrainError(
            f"a local Ray did not start ({reason}); check the space and permissions of "
            "Ray's temp folder, or point RAY_TMPDIR at another short path"
        ) from err

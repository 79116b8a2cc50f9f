"""Where prepare's per-image work runs: in this process, in a pool of processes using every core
of this machine, or on a Ray cluster (actors on a private local Ray, or on the cluster joined
with `--address` as `dtrain tune` joins one). Every engine runs the same task function on the
same task list and hands the results back in task order, so the bytes written do not depend on
the engine or the number of workers.

A job is a module-level function `task(context, spec) -> result` (picklable), with a `context`
(the source, the rows) sent to each worker once and one `spec` per task (a chunk of images, a
shard). A DtrainError raised in a Ray worker is raised here as itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

from dtrain.errors import DtrainError

Engine = Literal["process", "ray"]
Task = Callable[[Any, Any], Any]

_context: Any = None  # a pool worker's context, set once by its initializer
RAY_OBJECT_STORE_MB = 512  # a private Ray's: its workers pass only fingerprints and checksums


def default_workers(engine: Engine = "process", address: str = "") -> int:
    """The cores this process may use; on a Ray cluster at `address`, the cluster's (joined here:
    the engine then finds Ray started)."""
    if engine == "ray" and address:
        import ray

        from dtrain.ray_cluster import start_ray

        start_ray(address, object_store_mb=RAY_OBJECT_STORE_MB)
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _set_context(context: Any) -> None:
    """A pool worker's start: its context, and one thread for OpenMP (faiss), as it is one of a
    core's worth of workers; OpenMP threads that outnumber the cores spin and stall each other."""
    global _context
    os.environ["OMP_NUM_THREADS"] = "1"  # before faiss loads OpenMP in this process
    _context = context


def _run_in_pool(job: tuple[Task, Any]) -> Any:
    task, spec = job
    return task(_context, spec)


def _process_results(task: Task, context: Any, specs: list, workers: int) -> Iterator[Any]:
    if workers <= 1 or len(specs) <= 1:
        for spec in specs:
            yield task(context, spec)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold threads (faiss' OpenMP, tqdm's monitor) that fork would copy
    with ProcessPoolExecutor(
        max_workers=min(workers, len(specs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_context,
        initargs=(context,),
    ) as pool:
        yield from pool.map(_run_in_pool, [(task, spec) for spec in specs])


class _RayWorker:
    """A Ray actor that runs any job's tasks. It fetches a job's context on its first task of
    that job and keeps it, so a context crosses the cluster once per worker, not once per task;
    the actors outlive a job, so prepare's passes (fingerprints, search, shards) start workers
    once, not once each."""

    def __init__(self) -> None:
        self.job: str | None = None
        self.context: Any = None

    def run(self, job: str, context_ref: list, task: Task, spec: Any) -> Any:
        if job != self.job:
            import ray

            self.job, self.context = None, None  # the last job's context, freed first
            self.context = ray.get(context_ref[0])
            self.job = job
        return task(self.context, spec)


_ray_pool: tuple[str, list] | None = None  # (the Ray job id, its actors)


def _ray_actors(workers: int) -> list:
    """`workers` actors of this Ray connection, started once and reused by later jobs."""
    global _ray_pool
    import ray

    session = ray.get_runtime_context().get_job_id()
    if _ray_pool is None or _ray_pool[0] != session or len(_ray_pool[1]) != workers:
        remote = ray.remote(num_cpus=1)(_RayWorker)
        _ray_pool = (session, [remote.remote() for _ in range(workers)])
    return _ray_pool[1]


def _ray_results(
    task: Task, context: Any, specs: list, workers: int, address: str
) -> Iterator[Any]:
    """The tasks on Ray actors, each running one and holding one queued; results handed back in
    task order."""
    import uuid
    from collections import deque

    import ray

    from dtrain.ray_cluster import start_ray

    start_ray(address, object_store_mb=RAY_OBJECT_STORE_MB, num_cpus=None if address else workers)
    actors = _ray_actors(workers)[: len(specs)]
    job, context_ref = uuid.uuid4().hex, [ray.put(context)]  # in a list: Ray passes it as is
    free, pending = list(actors) * 2, deque()
    for spec in specs:
        if not free:  # the oldest task's actor takes the next one
            ref, actor = pending.popleft()
            yield _result(ref)
            free.append(actor)
        actor = free.pop()
        pending.append((actor.run.remote(job, context_ref, task, spec), actor))
    for ref, _ in pending:
        yield _result(ref)


def _result(ref: Any) -> Any:
    """A task's result; a DtrainError it raised (a bad shard, a bad image) as itself, so that
    it reads as one line, not as Ray's traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, DtrainError):
            raise err.cause from None
        raise


def run_tasks(
    task: Task,
    context: Any,
    specs: list,
    engine: Engine = "process",
    workers: int = 1,
    address: str = "",
) -> Iterator[Any]:
    """`task(context, spec)` for every spec, on `workers` processes of `engine`, results in the
    order of `specs`."""
    if engine == "ray":
        return _ray_results(task, context, specs, workers, address)
    return _process_results(task, context, specs, workers)

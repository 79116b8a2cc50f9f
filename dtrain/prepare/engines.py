"""Where prepare's per-image work runs: in this process, in a pool of processes using every core
of this machine, or on a Ray cluster (Ray Data, joined with `--address` as `dtrain tune` joins
one). Every engine runs the same task function on the same task list and hands the results back
in task order, so the bytes written do not depend on the engine or the number of workers.

A job is a module-level function `task(context, spec) -> dict of arrays` with a `context` (the
source, the rows) sent to each worker once, and one `spec` per task (a chunk of images, a shard).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

Engine = Literal["process", "ray"]
Task = Callable[[Any, Any], dict]

_context: Any = None  # a pool worker's context, set once by its initializer


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _set_context(context: Any) -> None:
    global _context
    _context = context


def _run_in_pool(job: tuple[Task, Any]) -> dict:
    task, spec = job
    return task(_context, spec)


def _process_results(task: Task, context: Any, specs: list, workers: int) -> Iterator[dict]:
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


class _RayTask:
    """A Ray Data actor: the context is fetched once, then each one-row batch names a task."""

    def __init__(self, task: Task, context_ref: Any, specs_ref: Any) -> None:
        import ray

        self.task = task
        self.context = ray.get(context_ref)
        self.specs = ray.get(specs_ref)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        (number,) = batch["task"]
        result = self.task(self.context, self.specs[int(number)])
        return {"task": np.asarray([number]), **{k: [v] for k, v in result.items()}}


def _ray_results(
    task: Task, context: Any, specs: list, workers: int, address: str
) -> Iterator[dict]:
    import numpy as np
    import ray

    from dtrain.ray_cluster import start_ray

    start_ray(address, object_store_mb=512, num_cpus=None if address else workers)
    data = ray.data.DataContext.get_current()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not lines per dataset run
    data.execution_options.preserve_order = True
    data.enable_progress_bars = False
    tasks = ray.data.from_items(
        [{"task": i} for i in range(len(specs))], override_num_blocks=len(specs)
    )
    results = tasks.map_batches(
        _RayTask,
        fn_constructor_kwargs={
            "task": task,
            "context_ref": ray.put(context),
            "specs_ref": ray.put(specs),
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(specs))),
        num_cpus=1,
    )
    batches = results.iter_batches(batch_size=1, batch_format="numpy")
    for expected, batch in enumerate(batches):
        (number,) = batch.pop("task")
        if number != expected:  # preserve_order is Ray's promise; the bytes depend on it
            raise RuntimeError(f"Ray Data returned task {number} where {expected} was next")
        yield {k: np.asarray(v[0]) for k, v in batch.items()}


def run_tasks(
    task: Task,
    context: Any,
    specs: list,
    engine: Engine = "process",
    workers: int = 1,
    address: str = "",
) -> Iterator[dict]:
    """`task(context, spec)` for every spec, on `workers` processes of `engine`, results in the
    order of `specs`."""
    if engine == "ray":
        return _ray_results(task, context, specs, workers, address)
    return _process_results(task, context, specs, workers)

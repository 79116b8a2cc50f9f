"""How a rank starts its DataLoader workers: from a fork server rather than from itself, each
worker ignoring the stop signals, which are its rank's to handle."""

from __future__ import annotations

import multiprocessing

from dtrain import stop_signal


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked by a fork server, not by the rank. A rank has threads (gloo's run loop,
    the TensorBoard writer), and forking a threaded process can hang the child: CPython before
    3.11.8 (gh-112275) deadlocks a new worker inside `os.fork` when another thread held the
    interpreter's thread-list lock at that moment; gloo's thread takes it whenever it frees a
    tensor after a collective. Seen as an epoch that never ends. The server is one process per
    rank, started by its first loader with workers (dtrain.dataset.worker_server).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dtrain.dataset.worker_server"])
    return context


def worker_init(worker_id: int) -> None:
    """Stop signals are the rank's to handle, not its workers' (stop_signal.leave_to_the_parent)."""
    stop_signal.leave_to_the_parent()

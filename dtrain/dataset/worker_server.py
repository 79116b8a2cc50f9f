"""Imported once by the fork server that starts a rank's DataLoader workers (see
`workers.worker_context`): the server ignores the stop signals, as its workers do, and holds the
loader's modules, so that each worker it forks starts without importing torch again.

SLURM signals every process of a job step (`scancel --signal=TERM`, `scontrol requeue`, a
preemption). A fork server that died of that TERM would take its workers with it: they exit when
their parent does, and the rank would crash instead of checkpointing."""

from dtrain import stop_signal
from dtrain.dataset import loader  # noqa: F401  (imported for the workers it forks)

stop_signal.leave_to_the_parent()

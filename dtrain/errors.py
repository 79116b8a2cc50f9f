"""The errors a user can fix. The CLI catches `DtrainError` only: it prints the one-line message
and exits 2; anything else is a bug in dtrain and shows its traceback (exit 1)."""

from __future__ import annotations


class DtrainError(Exception):
    """A problem with the input, data, cluster or run folder; the message says what to fix."""


class ConfigError(DtrainError, ValueError):
    """A config key or value that is wrong; the message says which and what would be right."""


class DataError(DtrainError, ValueError):
    """A source, shard, manifest or sample that cannot be used; the message names it."""


class DistributedError(DtrainError, RuntimeError):
    """Ranks that cannot talk to each other; the message says which rank and which address."""


class NonFiniteLossError(DtrainError, FloatingPointError):
    """Training diverged; the message says where the last good weights are and what to change."""


class RunFolderError(DtrainError):
    """A run folder that cannot be started, resumed or evaluated as asked."""

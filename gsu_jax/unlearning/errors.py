"""The unlearning job's own errors, one class per way it refuses or stops (the exit statuses of ``unlearn.py``).

Their own module because every layer raises them: the config parsing and the planning refuse requests
(:class:`UnlearnConfigError`), the result store refuses damaged files (:class:`SavedResultError`) and the run loop
stops diverged runs (:class:`UnlearningDivergedError`).
"""

from __future__ import annotations

from gsu_jax import checkpointing
from gsu_jax.schema import ConfigError

__all__ = ["SavedResultError", "UnlearnConfigError", "UnlearningDivergedError"]


class UnlearnConfigError(ConfigError):
    """A request ``unlearn.py`` refuses before any work (exit status 2): one line, naming the value."""


class UnlearningDivergedError(RuntimeError):
    """A run's updates stayed non-finite (or a model to save is not finite); nothing of that run was saved."""


class SavedResultError(checkpointing.CheckpointCorruptError):
    """A (method, seed) result saved in the workdir is unreadable or damaged (``unlearn.py`` exits 1)."""

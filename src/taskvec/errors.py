"""Error types. Every user-facing failure is a :class:`TaskvecError` with a one-line message."""

from __future__ import annotations


class TaskvecError(Exception):
    """Base class: the CLI prints ``taskvec: error: <message>`` and exits non-zero."""


class CheckpointError(TaskvecError):
    """A checkpoint is missing, unreadable, corrupt or of an unknown layout."""


class IncompatibleError(TaskvecError):
    """Checkpoints (or task vectors) do not fit together: missing tensors, shape mismatches."""


class ConfigError(TaskvecError):
    """A merge configuration is malformed or names something that does not exist."""


class OutputError(TaskvecError):
    """The output path cannot be written (exists without overwrite, not a folder, ...)."""


class NumericError(TaskvecError):
    """A computation produced NaN or Inf."""

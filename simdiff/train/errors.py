"""Training-side errors. Each message is one line; the CLI prints it and exits with status 2."""

from __future__ import annotations

__all__ = ["CheckpointError", "RunDirError", "RunLockedError"]


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message is ``<path>: <reason>`` on one line."""


class RunDirError(CheckpointError):
    """The run directory cannot be written (disk full, read-only, not a directory); the message names the file, what
    to do, and whether the run can be resumed."""


class RunLockedError(RunDirError):
    """Another live process owns the run directory; the message names its PID."""

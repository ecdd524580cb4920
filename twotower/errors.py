"""The errors twotower raises on purpose, and the exit code each maps to.

A `UsageError` is the user's to fix (bad input, a backend this machine lacks):
the CLI prints its message as one line, with no traceback, and exits 2 (a `DiskFull`, 4).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_GAVE_UP = 3
EXIT_DISK_FULL = 4
EXIT_INTERRUPTED = 130


class TwotowerError(Exception):
    """Base class of twotower's own errors."""


class UsageError(TwotowerError):
    """Bad input or usage; the message is one line that says what to do. Exit code 2."""

    exit_code = EXIT_USAGE


class EngineUnavailable(UsageError):
    """A backend or miner this machine cannot run (MPS on Linux, faiss not installed)."""


class DataError(UsageError):
    """A dataset that cannot be used as it is; the message names the file, the key and the fix."""


class DiskFull(UsageError):
    """A write of the run failed with ENOSPC or EDQUOT: no restart or engine switch frees a
    disk. The message names the file, the free space and what to do. Exit code 4."""

    exit_code = EXIT_DISK_FULL

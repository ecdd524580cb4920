"""The errors twotower raises on purpose, and the exit code each maps to.

A `UsageError` is the user's to fix (bad input, a backend this machine lacks):
the CLI prints its message as one line, with no traceback, and exits 2.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_GAVE_UP = 3
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

"""A process's return code in words: the one place a signal number or exit code becomes text.

Popen's convention: a negative return code means the process was killed by that signal. The
supervisor's report, a miner worker's crash and the OpenMP census all describe an ending with
`ExitStatus`, so a user reads "killed by SIGSEGV" or "exited with code 3" the same way
everywhere.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

SIGNAL_MEANINGS = {
    "SIGSEGV": "segmentation fault: native code touched memory it does not own",
    "SIGBUS": "bus error: a bad memory access, e.g. a memory-mapped file that shrank",
    "SIGABRT": "abort: native code gave up: a failed assertion, a double free, OpenMP refusing",
    "SIGKILL": "killed outright from outside: OOM killer, macOS jetsam, a watchdog or kill -9",
    "SIGILL": "illegal instruction: machine code this CPU cannot run",
    "SIGFPE": "arithmetic fault in native code (integer division by zero)",
    "SIGTERM": "asked to terminate",
    "SIGINT": "interrupted",
}


def signal_name(number: int) -> str:
    """11 -> 'SIGSEGV'; an unknown number -> 'signal N'."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class ExitStatus:
    """A child's return code: negative means killed by that signal (Popen's convention)."""

    returncode: int

    @property
    def signal(self) -> str | None:
        """'SIGSEGV' for -11, None for a normal exit."""
        return signal_name(-self.returncode) if self.returncode < 0 else None

    @property
    def code(self) -> int | None:
        """The exit code of a normal exit, None when a signal ended the process."""
        return self.returncode if self.returncode >= 0 else None

    def describe(self, meaning: bool = True) -> str:
        """'killed by SIGSEGV (segmentation fault: ...)' or 'exited with code 1'.

        meaning=False leaves out the signal's explanation in brackets, for a line that
        already says what the process was doing.
        """
        if self.signal is None:
            return f"exited with code {self.returncode}"
        explanation = SIGNAL_MEANINGS.get(self.signal) if meaning else None
        return f"killed by {self.signal}" + (f" ({explanation})" if explanation else "")

    def shell_code(self) -> int:
        """The exit code a shell would report: the code itself, or 128 + signal number."""
        return self.returncode if self.returncode >= 0 else 128 - self.returncode

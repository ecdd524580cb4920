"""A supervised child's side of the crash contract: where faulthandler writes, who watches.

The supervisor (guard/) sets $TWOTOWER_CRASH_FILE and $TWOTOWER_SUPERVISOR_PID
for its child; the child (the trainer, a miner worker) calls
`enable_crash_dumps` so that a fatal signal leaves every thread's stack in that
file. It lives here, below both, so the trainer never imports guard/.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
from pathlib import Path
from typing import IO

CRASH_FILE_ENV = "TWOTOWER_CRASH_FILE"  # where a supervised child's faulthandler writes
SUPERVISOR_PID_ENV = "TWOTOWER_SUPERVISOR_PID"  # a child whose parent is gone stops cleanly

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_crash_stream: IO[str] | None = None


def enable_crash_dumps() -> Path | None:
    """In a supervised child: send faulthandler's output to the file named by
    $TWOTOWER_CRASH_FILE (fatal signals: the traceback of every thread) and make
    SIGUSR1 dump every thread's stack there (the watchdog's request).

    Returns that path, or None when the variable is unset (nothing is changed).
    """
    global _crash_stream
    path = os.environ.get(CRASH_FILE_ENV)
    if not path:
        return None
    _crash_stream = open(path, "a")  # noqa: SIM115 - faulthandler writes to it until exit
    faulthandler.enable(file=_crash_stream, all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=_crash_stream, all_threads=True)
    return Path(path)


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG).

    For a torchrun rank's trainer: torchrun ends a stuck rank by killing its guard, and
    the trainer (in a session of its own) must not outlive it. Returns False where the
    call is unavailable (not Linux): there the trainer's own check of its parent, at
    each phase point, remains.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False

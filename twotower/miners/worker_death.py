"""What a miner worker leaves behind when it dies, for a crash report like a trainer's.

The worker writes faulthandler's stacks into a file of its own ($TWOTOWER_CRASH_FILE, see
`twotower.process.crash_dump`); it tells its OpenMP runtimes in its replies; its peak RSS comes from
the kernel's rusage when it is reaped; a native crash leaves a core (its limit is raised for the
worker alone at its start), read into native frames. `WorkerRecord.evidence` gathers those with
the signal, the request it was serving (phase, step) and its timing into one JSON-ready dict, which
`MinerCrashed.evidence` carries up to whoever writes the report (guard/, via the trainer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twotower.process import faults, native_stacks
from twotower.process.cores import CorePlan
from twotower.process.crash_dump import CRASH_FILE_ENV
from twotower.process.exit_status import signal_name

PROCESS = "miner worker"
STACKS_LIMIT = 64 << 10  # bytes of faulthandler output kept in a report
REAP_POLL = 0.01


class WorkerRecord:
    """Evidence about one worker process, kept while it runs (see the module docstring)."""

    def __init__(self, miner: str, command: list[str]):
        self.miner = miner
        self.command = command
        handle, path = tempfile.mkstemp(prefix=f"twotower-{miner}-worker-", suffix=".stacks.txt")
        os.close(handle)
        self.stack_file = Path(path)
        self.started = time.time()
        self.openmp: list[str] | None = None
        self.peak_rss_kb: int | None = None
        self.cores = CorePlan.prepare(Path.cwd())  # its core, if it crashes: native frames
        self.hang_stacks: dict[str, Any] | None = None  # its native stacks, when it went silent

    def started_as(self, pid: int) -> None:
        """Just after the worker `pid` started: the core limit its native frames need."""
        self.cores.allow(pid)

    def env(self) -> dict[str, str]:
        """Environment variables for the worker: where its faulthandler writes."""
        return {CRASH_FILE_ENV: str(self.stack_file)}

    def note_reply(self, reply: dict[str, Any]) -> None:
        """Keep what a reply tells about the worker (its OpenMP runtimes)."""
        if "openmp" in reply:
            self.openmp = reply["openmp"]

    def reap(self, process: subprocess.Popen[bytes], timeout: float | None) -> int | None:
        """Wait up to `timeout` s for `process` to end and reap it with its rusage (peak RSS).

        Returns its return code (Popen's convention), None if it still runs.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while process.returncode is None:
            try:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: no rusage
                return process.wait()
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                scale = 1024 if sys.platform == "darwin" else 1  # macOS reports bytes
                self.peak_rss_kb = int(usage.ru_maxrss // scale)
                break
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(REAP_POLL)
        return process.returncode

    def evidence(
        self,
        process: subprocess.Popen[bytes],
        request: dict[str, Any],
        watchdog: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The dead worker's evidence: who, how it ended, doing what, memory, OpenMP, stacks."""
        try:
            stacks = self.stack_file.read_text(errors="replace")[-STACKS_LIMIT:] or None
        except OSError:
            stacks = None
        return {
            "process": PROCESS,
            "miner": self.miner,
            "pid": process.pid,
            "returncode": process.returncode,
            "command": self.command,
            "started": self.started,
            "seconds": round(time.time() - self.started, 2),
            "phase": request.get("phase") or request.get("op"),
            "step": request.get("step", faults.current_step()),
            "peak_rss_kb": self.peak_rss_kb,
            "openmp": self.openmp,
            "stacks": stacks,
            "watchdog": watchdog,
            "native": self.native(process) or self.hang_stacks,
        }

    def read_hung_stacks(self, pid: int) -> None:
        """Before a silent worker is killed: every thread's native stack, gdb attached."""
        try:
            self.hang_stacks = native_stacks.from_pid(pid).as_dict()
        except Exception as error:  # noqa: BLE001 - the kill must follow whatever happens
            note = f"native stacks failed: {type(error).__name__}: {error}"
            self.hang_stacks = native_stacks.unavailable("attach", note).as_dict()

    def native(self, process: subprocess.Popen[bytes]) -> dict[str, Any] | None:
        """The dead worker's native frames from its core (None: it died of no native crash)."""
        code = process.returncode
        if code is None or code >= 0 or signal_name(-code) not in native_stacks.CRASH_SIGNALS:
            return None
        try:
            return self.cores.native_section(process.pid, sys.executable, self.started)
        except Exception as error:  # noqa: BLE001 - a failure here costs only the frames
            note = f"native frames failed: {type(error).__name__}: {error}"
            return native_stacks.unavailable("core", note).as_dict()

    def discard(self) -> None:
        """Remove the stack file (the worker is gone and its evidence taken or not needed)."""
        self.stack_file.unlink(missing_ok=True)

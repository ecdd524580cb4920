"""The writer's lock: one process tree trains into a run directory at a time.

RUN/lock is an empty file that the writer holds with `flock(LOCK_EX | LOCK_NB)` for as long
as it runs; RUN/lock.json names the holder (pid, host, since when, command), replaced
atomically. The kernel drops the lock when the holder exits, however it ends (SIGKILL too),
so a lock.json found beside a free lock names a holder that is gone: the next writer takes the
lock over and says so. A second writer while the lock is held is refused at once, naming the
holder (`RunInUse`, exit code 2).

Who holds it: the supervisor, for itself and its children (a supervised trainer finds the
lock held by its own supervisor and goes on); an unsupervised trainer, for itself; under
torchrun, rank 0's trainer for the group (the other ranks write no run files). Readers (eval,
export, encode, search, replay, report) take no lock: they read committed files only.

flock is advisory and per host: on a local filesystem (Linux, macOS) it holds. On NFS,
Linux emulates flock with POSIX byte-range locks, which hold across hosts only where the
server's lock manager runs (NFSv4, or v3 with lockd); SMB and FUSE filesystems may not
honour it at all. There a second writer on another host is not stopped: lock.json still names
the holder for a person to read. Known limitation: when a supervisor is killed alone, its
trainer checkpoints and stops after the step in flight, unlocked for that moment.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from twotower.atomic import replace_file
from twotower.errors import UsageError

LOCK_NAME = "lock"  # the file held with flock; never replaced or removed while held
HOLDER_NAME = "lock.json"  # who holds it: `Holder`, as JSON


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run's lock: process id, host name, the unix time it took
    the lock, and the command line it runs."""

    pid: int
    host: str
    since: float
    command: str = ""

    def describe(self) -> str:
        """'pid 123 on host-a since 2026-12-07 16:20:01 UTC'."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"pid {self.pid} on {self.host} since {when}"

    @classmethod
    def this_process(cls) -> Holder:
        """This process, now."""
        command = " ".join(["twotower", *sys.argv[1:]]) if sys.argv else ""
        return cls(os.getpid(), socket.gethostname(), round(time.time(), 3), command)


class RunInUse(UsageError):
    """Another process holds the run's lock (`holder`: who, None when lock.json is unreadable)."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


def read_holder(run: str | Path) -> Holder | None:
    """The holder lock.json names (the one now, or the last one), None when there is none."""
    try:
        record = json.loads((Path(run) / HOLDER_NAME).read_text())
        return Holder(
            int(record["pid"]),
            str(record["host"]),
            float(record["since"]),
            str(record.get("command", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """The lock of the run directory `run` (created if need be); `acquire`, then `release`."""

    def __init__(self, run: str | Path):
        self.root = Path(run)
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock and record this process as its holder. Returns one line to show when
        it was taken over from a holder that is gone, else None. Raises RunInUse when another
        process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.root)
            who = holder.describe() if holder else "a process whose lock.json is unreadable"
            raise RunInUse(
                f"{self.root} is in use by another trainer ({who}); wait for it to end or stop "
                "it, or choose another --out",
                holder,
            ) from None
        self._fd = fd
        before = read_holder(self.root)
        replace_file(self.root / HOLDER_NAME, json.dumps(asdict(Holder.this_process())))
        if before is None or before.pid == os.getpid():
            return None
        return (
            f"{self.root}: took over the lock of {before.describe()}, which is no longer "
            "running (its run stopped without releasing it)"
        )

    def release(self) -> None:
        """Remove lock.json and let go of the lock; nothing when this process does not hold
        it (idempotent)."""
        if self._fd is None:
            return
        (self.root / HOLDER_NAME).unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def own_run(
    run: str | Path, covered_by: int | None, writes: bool = True
) -> tuple[RunLock, str | None]:
    """Make this process the run's writer: (its lock, a take-over line or None). The lock is
    left untaken (its `release` does nothing) where this process writes no run files
    (`writes` False: a torchrun rank other than 0), or where `covered_by`, the pid of this
    trainer's supervisor, holds it on this host for us. Raises RunInUse otherwise."""
    lock = RunLock(run)
    if not writes:
        return lock, None
    try:
        return lock, lock.acquire()
    except RunInUse as refusal:
        holder = refusal.holder
        if holder is not None and (holder.pid, holder.host) == (covered_by, socket.gethostname()):
            return lock, None
        raise

"""Core dumps of one watched child (Linux): allowed for it alone, found, read, deleted.

`CorePlan.prepare(cwd)` reads /proc/sys/kernel/core_pattern and decides where a core of the
child would land: a file pattern (`core`, `core.%p`, `/var/crash/core.%e.%p`; relative ones
are in the child's working directory; core_uses_pid appends `.PID`), systemd-coredump
(`|.../systemd-coredump ...`, read back through `coredumpctl`) or another pipe handler, which
keeps nothing we can find. A core is as large as the process's anonymous memory, so the limit
given to the child is the free space of the core's filesystem less a reserve; with less than
`MIN_FREE` free it stays 0. `plan.allow(pid)` raises RLIMIT_CORE of the child alone, from
outside (prlimit, just after it starts: no preexec_fn, which may deadlock a forked child of a
threaded parent); nothing else changes before a crash. After one,
`plan.native_section(pid, executable, since)` finds the core (or says in one line why there is
none), reads it (`process.native_stacks`) and deletes it unless it is to be kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twotower.process import native_stacks

PATTERN_FILE = Path("/proc/sys/kernel/core_pattern")
USES_PID_FILE = Path("/proc/sys/kernel/core_uses_pid")
RESERVE = 1 << 30  # bytes left free on the core's filesystem whatever the core's size
MIN_FREE = 256 << 20  # below this much room for a core, no core is asked for
KEEP_CORE_ENV = "TWOTOWER_KEEP_CORE"  # 1: keep the core after reading it (--keep-core)


@dataclass
class CorePlan:
    """Where a crashing child's core would go and how large it may be.

    kind: 'file' (pattern is a path pattern), 'coredumpctl' (systemd-coredump keeps it) or
    'none' (no core for us: note says why). limit: RLIMIT_CORE for the child, in bytes.
    """

    kind: str
    cwd: Path
    pattern: str = ""
    uses_pid: bool = False
    limit: int = 0
    note: str | None = None
    keep: bool = False
    raised: bool = False  # allow() lifted a limit of 0: any core after it is ours to clean

    @classmethod
    def prepare(cls, cwd: Path, keep: bool | None = None) -> CorePlan:
        """The plan for a child started in `cwd` (Linux; elsewhere kind 'none')."""
        keep = os.environ.get(KEEP_CORE_ENV) == "1" if keep is None else keep
        if not sys.platform.startswith("linux"):
            why = "macOS keeps crash reports, not cores" if sys.platform == "darwin" else ""
            return cls("none", cwd, note=f"no core on {sys.platform}" + (f": {why}" if why else ""))
        try:
            pattern = PATTERN_FILE.read_text().strip()
        except OSError as error:
            return cls("none", cwd, note=f"no core: {PATTERN_FILE} unreadable ({error.strerror})")
        if pattern.startswith("|"):
            handler = pattern[1:].split()[0] if pattern[1:].split() else "?"
            if "systemd-coredump" in handler and shutil.which("coredumpctl"):
                return cls("coredumpctl", cwd, pattern, limit=resource.RLIM_INFINITY, keep=keep)
            note = f"no core: core_pattern pipes cores to {handler}, which keeps none for us"
            return cls("none", cwd, pattern, note=note)
        uses_pid = _read_flag(USES_PID_FILE)
        folder = (cwd / pattern).parent if "/" in pattern else cwd
        try:
            free = shutil.disk_usage(folder).free
        except OSError as error:
            return cls("none", cwd, pattern, note=f"no core: {folder}: {error.strerror}")
        if free - RESERVE < MIN_FREE:
            note = f"no core: {free >> 20} MiB free in {folder}, a core needs room"
            return cls("none", cwd, pattern, uses_pid, note=note)
        return cls("file", cwd, pattern, uses_pid, free - RESERVE, keep=keep)

    def allow(self, pid: int) -> str | None:
        """Allow the process `pid` a core of up to `limit` bytes (nothing when no core is
        planned). Returns None, or the one line saying why it could not be allowed."""
        if self.kind == "none":
            return None
        try:
            before, hard = resource.prlimit(pid, resource.RLIMIT_CORE)
            soft = self.limit if hard == resource.RLIM_INFINITY else min(self.limit, hard)
            resource.prlimit(pid, resource.RLIMIT_CORE, (soft, hard))
            self.raised = before == 0
        except (OSError, ValueError) as error:  # it is gone already, or not ours to change
            self.kind, self.note = "none", f"no core: its core limit stays ({error})"
            return self.note
        return None

    def find(self, pid: int, executable: str, since: float) -> tuple[Path | None, str | None]:
        """(the core of `pid`, None) or (None, one line saying why there is none)."""
        if self.kind == "none":
            return None, self.note
        if self.kind == "coredumpctl":
            return _from_coredumpctl(pid)
        for path in self._candidates(pid, executable):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mtime >= since - 1:
                    return path, None
        return None, f"no core: none at {self.cwd / self.expected(pid, executable)}"

    def expected(self, pid: int, executable: str) -> str:
        """The pattern with what is known filled in: '%p' -> pid, '%e' -> the name, ..."""
        name = Path(executable).name[:15]
        known = {
            "p": str(pid),
            "P": str(pid),
            "e": name,
            "E": executable.replace("/", "!"),
            "h": socket.gethostname(),
            "u": str(os.getuid()),
            "g": str(os.getgid()),
            "%": "%",
        }
        text = re.sub(r"%(.)", lambda m: known.get(m.group(1), "*"), self.pattern)
        if self.uses_pid and "%p" not in self.pattern and "%P" not in self.pattern:
            text += f".{pid}"
        return text

    def sweep(self, since: float) -> list[Path]:
        """Delete the cores that processes the child started left since `since` (they inherit
        its limit; the child's own is read and deleted by `native_section`), unless kept or
        the limit was not ours to raise. Returns the paths deleted."""
        if self.kind != "file" or self.keep or not self.raised:
            return []
        pattern = re.sub(r"%.", "*", self.pattern)
        if self.uses_pid and "%p" not in self.pattern and "%P" not in self.pattern:
            pattern += ".*"
        base = Path("/") if pattern.startswith("/") else self.cwd
        deleted = []
        for path in base.glob(pattern.lstrip("/")):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= since - 1 and native_stacks.is_core(path):
                    path.unlink()
                    deleted.append(path)
        return deleted

    def _candidates(self, pid: int, executable: str) -> list[Path]:
        pattern = self.expected(pid, executable)
        base = Path("/") if pattern.startswith("/") else self.cwd
        relative = pattern.lstrip("/")
        if "*" not in relative:
            return [base / relative]
        return sorted(base.glob(relative), key=lambda p: p.stat().st_mtime, reverse=True)

    def native_section(
        self, pid: int, executable: str, since: float, dumped: bool = True
    ) -> dict[str, Any]:
        """The crash report's "native" section for `pid`, dead since: every thread's frames
        from its core (then deleted unless kept), or the one line saying why there are none.
        dumped: the kernel says it wrote a core (WCOREDUMP)."""
        core, why = self.find(pid, executable, since)
        if core is None:
            if self.kind == "file" and not dumped:
                why = f"no core: the kernel wrote none for pid {pid} ({why})"
            return native_stacks.unavailable("core", why or "no core").as_dict()
        stacks = native_stacks.from_core(core, executable)
        section = stacks.as_dict()
        section["core"] = self.discard(core)
        if stacks.pid not in (None, pid):
            section["note"] = f"the core is of pid {stacks.pid}, a process this one started"
        return section

    def discard(self, core: Path) -> str:
        """Delete `core` unless it is to be kept (or it came from coredumpctl, whose copy is a
        temporary file); the line saying which."""
        if self.keep and self.kind == "file":
            return f"core kept: {core} ({KEEP_CORE_ENV}=1 / --keep-core)"
        core.unlink(missing_ok=True)
        return "core deleted after reading" if self.kind == "file" else "core read from coredumpctl"


PF_DUMPCORE = 0x200  # linux/sched.h: the process is writing its core


def dumping_core(pid: int) -> bool:
    """True while the process `pid` writes its core (Linux; False where unknown). A signal
    that kills it then (SIGKILL, a parent's death signal) cuts the core short."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return len(fields) > 6 and int(fields[6]) & PF_DUMPCORE != 0


def _read_flag(path: Path) -> bool:
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return False


def _from_coredumpctl(pid: int) -> tuple[Path | None, str | None]:
    """systemd-coredump's core of `pid`, copied to a temporary file by `coredumpctl dump`."""
    target = Path(tempfile.mkstemp(prefix=f"twotower-core-{pid}-")[1])
    try:
        out = subprocess.run(
            ["coredumpctl", "dump", str(pid), "--output", str(target)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as error:
        target.unlink(missing_ok=True)
        return None, f"no core: coredumpctl failed ({error})"
    if out.returncode != 0 or target.stat().st_size == 0:
        target.unlink(missing_ok=True)
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"no core: coredumpctl has none for pid {pid} ({last})"
    return target, None

"""How much memory a process holds and how much the machine has left, from one reader each.

Linux answers through /proc (per process: VmRSS, VmHWM, RssAnon, RssFile, ...;
the machine: MemAvailable); elsewhere these return None and callers fall back.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def _kib_fields(path: Path) -> dict[str, int] | None:
    """The 'Name:  123 kB' lines of a /proc file, in KiB; None if it cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0])
    return fields


def proc_status(pid: int | None = None) -> dict[str, int] | None:
    """/proc/PID/status's sizes in KiB (VmRSS, VmHWM, RssAnon, RssFile, RssShmem, ...);
    pid None: this process. None where there is no /proc or the process is gone."""
    return _kib_fields(Path(f"/proc/{pid or 'self'}/status"))


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it is not known."""
    fields = _kib_fields(Path("/proc/meminfo"))
    return fields["MemAvailable"] * 1024 if fields and "MemAvailable" in fields else None


def peak_rss_kb() -> int:
    """getrusage's peak RSS of this process in KiB (macOS reports bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def process_memory() -> dict[str, int]:
    """This process's memory in bytes: pid, peak_rss and, on Linux, rss_anon, rss_file, rss_shmem.

    On Linux the peak is VmHWM, this program's own; getrusage's maxrss would
    include the parent's size at fork, which survives exec there.
    """
    memory = {"pid": os.getpid(), "peak_rss": peak_rss_kb() * 1024}
    names = {"VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}
    names["RssShmem"] = "rss_shmem"
    for key, value in (proc_status() or {}).items():
        if key in names:
            memory[names[key]] = value * 1024
    return memory

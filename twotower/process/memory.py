"""Process and machine memory and CPU time: the one reader every part uses.

psutil answers on Linux, macOS and Windows: a process's resident memory and CPU
time (`portable_reading`), the processes it started (`process_tree`), the
machine's total and available memory and swap (`machine_memory`). The
heartbeat, the supervisor's memory trend, `twotower watch`, crash reports,
`doctor --data`, the miner worker's stats and the benchmarks all read here.

Linux addition (`linux_reading`), where psutil has no equivalent and never the
only source: the split of resident memory into anonymous, file-backed and
shared-memory pages (RssAnon, RssFile, RssShmem) and another process's peak
(VmHWM), from /proc/PID/status. They tell a heap that grows from a
memory-mapped bank that is merely resident.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import psutil

# /proc/PID/status name -> our key (the Linux addition)
LINUX_FIELDS = {"VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}
LINUX_FIELDS["RssShmem"] = "rss_shmem"


def portable_reading(pid: int | None = None) -> dict[str, int | float] | None:
    """What psutil says of a process (pid None: this one), on every platform.

    Returns {"pid", "rss" (bytes), "cpu_s" (user + system CPU seconds), and
    "peak_rss" (bytes) where the platform keeps it: this process (getrusage),
    or any on Windows}; None when the process is gone, a zombie or unreadable.
    """
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            info = process.memory_info()
            times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    reading: dict[str, int | float] = {
        "pid": process.pid,
        "rss": info.rss,
        "cpu_s": round(times.user + times.system, 3),
    }
    if pid is None or pid == os.getpid():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reading["peak_rss"] = peak if sys.platform == "darwin" else peak * 1024
    elif hasattr(info, "peak_wset"):
        reading["peak_rss"] = info.peak_wset
    return reading


def linux_reading(pid: int | None = None) -> dict[str, int]:
    """The Linux addition: peak_rss (VmHWM), rss_anon, rss_file, rss_shmem in bytes.

    Empty where there is no /proc or the process is gone. VmHWM is this
    program's own peak; getrusage's would include the parent's size at fork,
    which survives exec on Linux.
    """
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if name in LINUX_FIELDS and len(parts) == 2 and parts[1] == "kB":
            found[LINUX_FIELDS[name]] = int(parts[0]) * 1024
    return found


def process_memory(pid: int | None = None) -> dict[str, int | float] | None:
    """A process's memory (pid None: this one): `portable_reading` plus, on Linux,
    `linux_reading`'s keys (its VmHWM replaces getrusage's peak). None when gone."""
    reading = portable_reading(pid)
    if reading is not None:
        reading.update(linux_reading(pid))
    return reading


def process_tree(pid: int) -> list[int]:
    """`pid` and every process it started, directly or not (psutil); [] when it is gone."""
    try:
        process = psutil.Process(pid)
        return [pid] + [child.pid for child in process.children(recursive=True)]
    except psutil.Error:
        return []


def rss_kb(pid: int | None = None, tree: bool = False) -> int | None:
    """Resident memory of a process in KiB (pid None: this one); None when it is gone.

    tree: the sum over the process and its descendants (`process_tree`), which counts a
    page that several of them share once per process.
    """
    pids = process_tree(pid or os.getpid()) if tree else [pid]
    readings = [reading for one in pids if (reading := portable_reading(one))]
    return sum(int(reading["rss"]) for reading in readings) // 1024 if readings else None


def peak_rss_kb(pid: int | None = None) -> int | None:
    """Peak resident memory of a process in KiB, None where it is not kept (see
    `portable_reading`: another process off Linux and Windows) or the process is gone."""
    reading = process_memory(pid)
    return int(reading["peak_rss"]) // 1024 if reading and "peak_rss" in reading else None


def machine_memory() -> dict[str, int]:
    """The machine's memory in bytes, from psutil: total, available (what can be
    used without swapping), swap_total, swap_used."""
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    return {
        "total": memory.total,
        "available": memory.available,
        "swap_total": swap.total,
        "swap_used": swap.used,
    }


def available_bytes() -> int:
    """The memory this machine can still give without swapping, in bytes."""
    return int(psutil.virtual_memory().available)

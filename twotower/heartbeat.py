"""The heartbeat: what the trainer is doing now, in a small JSON file replaced atomically.

The supervisor reads it to say where a child died (the last phase and step,
not the last log line) and its watchdog to notice a stall. Each beat carries
the process's resident memory, so a report can show its trend.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def memory_kb() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB; current is 0 where unknown."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        peak //= 1024  # macOS reports bytes, Linux KiB
    current = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1])
                    break
    except OSError:
        pass
    return current, peak


class Heartbeat:
    """Writes {pid, step, phase, backend, miner, rss_kb, peak_rss_kb, time} on every beat."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}")

    def beat(self, step: int, phase: str, **engines: Any) -> None:
        """Record `phase` at `step`; engines: backend=..., miner=... names in use."""
        rss, peak = memory_kb()
        record = {
            "pid": os.getpid(),
            "step": step,
            "phase": phase,
            **engines,
            "rss_kb": rss,
            "peak_rss_kb": peak,
            "time": time.time(),
        }
        self._tmp.write_text(json.dumps(record))
        os.replace(self._tmp, self.path)


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    """The last beat, or None when there is none (yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

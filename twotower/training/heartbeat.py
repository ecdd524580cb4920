"""The heartbeat: what the trainer is doing now, in a small JSON file replaced atomically.

The supervisor reads it to say where a child died (the last phase and step,
not the last log line) and its watchdog to notice a stall. Each beat carries
the process's resident memory, so a report can show its trend.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from twotower.atomic import replace_file
from twotower.memory import peak_rss_kb, proc_status


class Heartbeat:
    """Writes {pid, step, phase, backend, miner, rss_kb, peak_rss_kb, time} on every beat."""

    def __init__(self, path: Path):
        self.path = path

    def beat(self, step: int, phase: str, **engines: Any) -> dict[str, Any]:
        """Record `phase` at `step`; engines: backend=..., miner=... names in use.

        Returns the record written."""
        rss = (proc_status() or {}).get("VmRSS", 0)
        record = {
            "pid": os.getpid(),
            "step": step,
            "phase": phase,
            **engines,
            "rss_kb": rss,
            "peak_rss_kb": peak_rss_kb(),
            "time": time.time(),
        }
        replace_file(self.path, json.dumps(record))
        return record


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    """The last beat, or None when there is none (yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

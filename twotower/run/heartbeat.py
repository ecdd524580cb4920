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
from twotower.process.memory import process_memory


class Heartbeat:
    """Writes {pid, step, phase, backend, miner, ..., rss_kb, peak_rss_kb, cpu_s, time} on
    every beat (memory and CPU seconds from `twotower.process.memory`), plus `constant`'s fields."""

    def __init__(self, path: Path):
        self.path = path
        self.constant: dict[str, Any] = {}  # what every beat repeats: thread pools, budget

    def describe(self, **fields: Any) -> None:
        """Add `fields` to every later beat (e.g. threads=..., threadpools=...)."""
        self.constant.update(fields)

    def beat(self, step: int, phase: str, **engines: Any) -> dict[str, Any]:
        """Record `phase` at `step`; engines: backend=..., miner=... names in use.

        Returns the record written."""
        memory = process_memory() or {}
        record = {
            "pid": os.getpid(),
            "step": step,
            "phase": phase,
            **engines,
            **self.constant,
            "rss_kb": int(memory.get("rss", 0)) // 1024,
            "peak_rss_kb": int(memory.get("peak_rss", 0)) // 1024,
            "cpu_s": memory.get("cpu_s"),
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

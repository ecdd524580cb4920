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
from twotower.run.records import Beat


class Heartbeat:
    """Writes a `Beat` (pid, step, phase, backend, miner, ..., rss_kb, peak_rss_kb, cpu_s, time;
    memory and CPU seconds from `twotower.process.memory`) on every beat, with `constant`'s
    fields and the beat's own (openmp, progress) in its `extra`."""

    def __init__(self, path: Path):
        self.path = path
        self.constant: dict[str, Any] = {}  # what every beat repeats: thread pools, budget

    def describe(self, **fields: Any) -> None:
        """Add `fields` to every later beat (e.g. threads=..., threadpools=...)."""
        self.constant.update(fields)

    def beat(
        self,
        step: int,
        phase: str,
        backend: str | None = None,
        miner: str | None = None,
        **more: Any,
    ) -> Beat:
        """Record `phase` at `step` with the engines in use and `more` (openmp=..., progress=...).
        Returns the record written."""
        memory = process_memory() or {}
        record = Beat(
            pid=os.getpid(),
            step=step,
            phase=phase,
            backend=backend,
            miner=miner,
            rss_kb=int(memory.get("rss", 0)) // 1024,
            peak_rss_kb=int(memory.get("peak_rss", 0)) // 1024,
            cpu_s=memory.get("cpu_s"),
            time=time.time(),
            extra={**more, **self.constant},
        )
        replace_file(self.path, json.dumps(record.as_dict()))
        return record


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    """The last beat as its JSON document (what a crash report embeds), or None when there is
    none (yet)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_beat(path: Path) -> Beat | None:
    """The last beat as a `Beat`, or None when there is none (yet) or it is malformed."""
    doc = read_heartbeat(path)
    try:
        return Beat.from_dict(doc) if doc is not None else None
    except (KeyError, TypeError, ValueError):
        return None

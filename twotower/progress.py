"""Progress of long operations, and the liveness of a process that waits on another.

Code that may run for minutes (an index build, encoding every training query, an
exact search, a large checkpoint) opens a `task` and advances it; whoever runs the
process installs a `Sink` that decides what a task means there. The trainer's
sink (`twotower.training.phases`) writes the heartbeat and log lines; a miner
worker's sink sends each event to its parent over the reply pipe, where
`relay` hands it to the parent's sink. Without a sink a task costs a few
attribute writes.

`alive(source, cpu_seconds)` tells the sink that a process this one waits on
(the miner worker) is still working: its CPU time advanced. A process that
waits without using CPU (a deadlock, a stall) never advances it, so a
watchdog fed only by progress and liveness still catches a real hang.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

_ids = itertools.count(1)


@dataclass
class Task:
    """One long operation.

    name: what it is, as a heartbeat phase would say it ("build-index", "encode", ...);
    what: a human description with its size ("faiss IVF4096,Flat over 771,000 x 768 rows");
    total / done: units of work (None: unknown); unit: "rows", "queries", "bytes", ...;
    phase: True when the task names the heartbeat phase while it runs (False: a
    detail of the phase around it); announce: log its start at once (set-up steps).
    """

    name: str
    what: str
    total: int | None = None
    unit: str = ""
    phase: bool = True
    announce: bool = False
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    id: str = field(default_factory=lambda: f"{os.getpid()}-{next(_ids)}")

    @property
    def seconds(self) -> float:
        """Wall time since the task started."""
        return time.monotonic() - self.started

    def advance(self, amount: int = 1, what: str | None = None) -> None:
        """Count `amount` more units done (and, if given, a new description)."""
        self.done += amount
        if what is not None:
            self.what = what
        if _sink is not None:
            _sink.advance(self)

    def describe(self) -> str:
        """'build-index: faiss IVF64,Flat over 3,000 x 16 rows: 1,024 / 3,000 rows (34%), 2.1 s'."""
        text = f"{self.name}: {self.what}"
        if self.total:
            share = f" ({self.done / self.total:.0%})"
            text += f": {self.done:,} / {self.total:,} {self.unit}{share}"
        return text + f", {self.seconds:.1f} s"

    def summary(self) -> dict[str, Any]:
        """What a heartbeat shows of it: name, what, done, total, unit, seconds."""
        keep = ("name", "what", "done", "total", "unit")
        return {**{key: getattr(self, key) for key in keep}, "seconds": round(self.seconds, 1)}

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain data (what a worker sends and a heartbeat holds), with seconds."""
        record = asdict(self)
        record["seconds"] = round(self.seconds, 2)
        return record


class Sink(Protocol):
    """What a process does with progress: start(task), advance(task), end(task), alive(...)."""

    def start(self, task: Task) -> None: ...

    def advance(self, task: Task) -> None: ...

    def end(self, task: Task) -> None: ...

    def alive(self, source: str, cpu_seconds: float) -> None: ...


_sink: Sink | None = None
_relayed: dict[str, Task] = {}
_thread = threading.local()  # .details_only: this thread's tasks never name the phase


@contextmanager
def details_only() -> Iterator[None]:
    """Within this block, tasks this thread opens or relays are details (phase=False).

    A mining that runs in a thread beside training reports its progress (and its
    worker's liveness) without renaming the phase training is in, so a crash of the
    training step is not blamed on a search that happened to be running.
    """
    previous = getattr(_thread, "details_only", False)
    _thread.details_only = True
    try:
        yield
    finally:
        _thread.details_only = previous


def install(sink: Sink | None) -> Sink | None:
    """Make `sink` this process's (None: none); returns the one it replaces."""
    global _sink
    previous, _sink = _sink, sink
    return previous


@contextmanager
def task(
    name: str,
    what: str,
    total: int | None = None,
    unit: str = "",
    phase: bool = True,
    announce: bool = False,
) -> Iterator[Task]:
    """Run a block as a Task (see `Task` for the arguments); the sink hears its start and end."""
    phase = phase and not getattr(_thread, "details_only", False)
    current = Task(name, what, total, unit, phase, announce)
    if _sink is not None:
        _sink.start(current)
    try:
        yield current
    finally:
        if _sink is not None:
            _sink.end(current)


def relay(event: str, record: dict[str, Any]) -> None:
    """Replay another process's task event ("start", "advance" or "end" of a `Task.as_dict`)."""
    if _sink is None:
        return
    fields = {k: v for k, v in record.items() if k not in ("seconds", "started")}
    relayed = _relayed.get(record["id"])
    if relayed is None:
        relayed = _relayed[record["id"]] = Task(**fields)
        relayed.phase = relayed.phase and not getattr(_thread, "details_only", False)
        relayed.started = time.monotonic() - record.get("seconds", 0.0)
        _sink.start(relayed)
    relayed.done, relayed.what, relayed.total = record["done"], record["what"], record["total"]
    if event == "advance":
        _sink.advance(relayed)
    elif event == "end":
        del _relayed[record["id"]]
        _sink.end(relayed)


def end_relayed() -> None:
    """End every relayed task still open (its process died or stopped answering)."""
    for record_id in list(_relayed):
        relayed = _relayed.pop(record_id)
        if _sink is not None:
            _sink.end(relayed)


def alive(source: str, cpu_seconds: float) -> None:
    """Tell the sink that `source` (e.g. "miner worker pid 12") has used `cpu_seconds` so far."""
    if _sink is not None:
        _sink.alive(source, cpu_seconds)

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

`TaskLines` is the sink that turns tasks into lines of text: the trainer's
sink logs them (with its heartbeat), and `twotower eval` / `encode` / `search` print
them on stderr (`lines_on_stderr`).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

_ids = itertools.count(1)
LINE_EVERY = 30.0  # seconds between progress lines of one task
FIRST_LINE_AFTER = 5.0  # a task not announced at its start is shown once it runs this long


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

    def finished(self) -> str:
        """'encode: 1,733 rows in 2.1 s (825 rows/s)', or 'build-index: done in 2.1 s'."""
        if not self.total:
            return f"{self.name}: done in {self.seconds:.1f} s"
        rate = self.done / max(self.seconds, 1e-9)
        return (
            f"{self.name}: {self.done:,} {self.unit} in {self.seconds:.1f} s "
            f"({rate:,.0f} {self.unit}/s)"
        )

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


class TaskLines:
    """A Sink that says each long task in lines of text, through `say(line)`: when a task
    that announces itself starts, once any task has run `first_line_after` seconds, then
    every `line_every` seconds, and when a task that was shown ends (with its rate).

    Lines come from a ticker thread, so they appear even while the main thread sits in
    one long native call. `tasks` (open, outermost first) and `lock` are shared with a
    sink that builds on this one (the trainer's `PhaseReporter`).
    """

    def __init__(
        self,
        say: Callable[[str], None],
        line_every: float = LINE_EVERY,
        first_line_after: float = FIRST_LINE_AFTER,
    ):
        self.say = say
        self.line_every = line_every
        self.first_line_after = first_line_after
        self.tasks: list[Task] = []
        self.lock = threading.Lock()
        self._shown: dict[str, float] = {}  # task id -> when its last line was said
        self.cpu: dict[str, tuple[float, float]] = {}  # source -> (CPU seconds, when seen)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="twotower-lines")
        self._ticker.start()

    def close(self) -> None:
        """Stop the ticker thread."""
        self._stop.set()
        self._ticker.join()

    def start(self, task: Task) -> None:
        with self.lock:
            self.tasks.append(task)
            if task.announce:
                self._show(task, f"{task.name}: {task.what}")

    def advance(self, task: Task) -> None:
        """Nothing: the ticker says progress at its own pace."""

    def end(self, task: Task) -> None:
        with self.lock:
            if task in self.tasks:
                self.tasks.remove(task)
            if self._shown.pop(task.id, None) is not None:
                self.say(task.finished())

    def alive(self, source: str, cpu_seconds: float) -> None:
        self.cpu_advanced(source, cpu_seconds)

    def cpu_advanced(self, source: str, cpu_seconds: float) -> bool:
        """Record `source`'s CPU time (the lines name it); True when it grew since last seen.
        Under the lock: the ticker thread iterates `cpu`."""
        with self.lock:
            if cpu_seconds <= self.cpu.get(source, (-1.0, 0.0))[0]:
                return False
            self.cpu[source] = (cpu_seconds, time.monotonic())
            return True

    def _show(self, task: Task, line: str) -> None:
        self._shown[task.id] = time.monotonic()
        self.say(line)

    def _tick(self) -> None:
        every = min(1.0, self.first_line_after, self.line_every) / 2
        while not self._stop.wait(every):
            with self.lock:
                if not self.tasks:
                    continue
                task = self.tasks[-1]
                last = self._shown.get(task.id)
                due = (
                    task.seconds >= self.first_line_after
                    if last is None
                    else (time.monotonic() - last >= self.line_every)
                )
                if due:
                    recent = time.monotonic() - self.line_every
                    waiting = [
                        f"{source} used {cpu:.0f} s of CPU"
                        for source, (cpu, seen) in self.cpu.items()
                        if seen >= recent
                    ]
                    suffix = f" ({', '.join(waiting)})" if waiting and task.phase else ""
                    self._show(task, task.describe() + suffix)


@contextmanager
def lines_on_stderr() -> Iterator[None]:
    """While entered, long tasks (encoding, an evaluation, an index's build or load, a search)
    print lines on stderr: at the start, after 5 s, every 30 s, and at the end with their
    rate. What a command without a run directory (`eval`, `encode`, `search`) shows."""
    lines = TaskLines(lambda line: print(f"twotower: {line}", file=sys.stderr, flush=True))
    previous = install(lines)
    try:
        yield
    finally:
        install(previous)
        lines.close()

"""The trainer's progress sink: long phases in the heartbeat, in log.txt and on stderr.

`PhaseReporter` is the `twotower.progress.Sink` a trainer installs. For every
open task (its own, or one relayed from its miner worker) it

- beats the heartbeat with the phase (the outermost task that names one:
  build-index, load-index, encode, search, evaluate, checkpoint, ...) and the
  innermost task's progress, whenever that progress advances or the worker's
  CPU time does; so the supervisor's watchdog sees a long build that makes
  progress as alive, and a stall (no progress, no CPU) as the hang it is;
- logs a line (log.txt and stderr, the logger's two handlers, so it shows
  without a terminal) when a set-up task starts, when any task has run for
  FIRST_LINE_AFTER seconds, then every LINE_EVERY seconds, and when a task
  that was shown ends.

Lines come from a ticker thread, so they appear even while the main thread
sits in one long native call; heartbeats come only from the main thread's
evidence of progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from twotower.progress import Task

LINE_EVERY = 30.0  # seconds between progress lines of one task
FIRST_LINE_AFTER = 5.0  # a task not announced at its start is shown once it runs this long
BEAT_EVERY = 0.25  # at most this many seconds between heartbeats of advancing progress

Beat = Callable[[str, dict[str, Any]], None]  # (phase, extra heartbeat fields)


class PhaseReporter:
    """Progress sink of a trainer: beat(phase, fields) writes a heartbeat; lines go to `log`.

    base_phase: the phase the trainer is in outside any task (set by the trainer).
    """

    def __init__(
        self,
        beat: Beat,
        log: logging.Logger,
        line_every: float = LINE_EVERY,
        first_line_after: float = FIRST_LINE_AFTER,
    ):
        self.beat = beat
        self.log = log
        self.base_phase = "load"
        self.line_every = line_every
        self.first_line_after = first_line_after
        self.tasks: list[Task] = []
        self._shown: dict[str, float] = {}  # task id -> when its last line was logged
        self._cpu: dict[str, tuple[float, float]] = {}  # source -> (CPU seconds, when seen)
        self._last_beat = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="twotower-phases")
        self._ticker.start()

    def enter(self, phase: str) -> None:
        """The trainer moves to `phase` (outside any task): beat it now."""
        self.base_phase = phase
        self._beat(force=True)

    def close(self) -> None:
        """Stop the ticker thread."""
        self._stop.set()
        self._ticker.join()

    # --- the Sink protocol (main thread) -----------------------------------------------

    def start(self, task: Task) -> None:
        with self._lock:
            self.tasks.append(task)
            if task.announce:
                self._show(task, f"{task.name}: {task.what}")
        self._beat(force=True)

    def advance(self, task: Task) -> None:
        self._beat(force=False)

    def end(self, task: Task) -> None:
        with self._lock:
            if task in self.tasks:
                self.tasks.remove(task)
            if self._shown.pop(task.id, None) is not None:
                self.log.info("%s: done in %.1f s", task.name, task.seconds)
        self._beat(force=True)

    def alive(self, source: str, cpu_seconds: float) -> None:
        if cpu_seconds > self._cpu.get(source, (-1.0, 0.0))[0]:
            self._cpu[source] = (cpu_seconds, time.monotonic())
            self._beat(force=False, cpu={"source": source, "cpu_s": round(cpu_seconds, 2)})

    # --- the heartbeat and the lines -----------------------------------------------------

    def phase(self) -> str:
        """The outermost open task that names a phase, else the base phase."""
        named = [task.name for task in self.tasks if task.phase]
        return named[0] if named else self.base_phase

    def _beat(self, force: bool, cpu: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_EVERY:
            return
        self._last_beat = now
        with self._lock:
            fields: dict[str, Any] = {}
            if self.tasks:
                fields["progress"] = self.tasks[-1].summary()
            if cpu is not None:
                fields["waiting_on"] = cpu
            phase = self.phase()
        self.beat(phase, fields)

    def _show(self, task: Task, line: str) -> None:
        self._shown[task.id] = time.monotonic()
        self.log.info("%s", line)

    def _tick(self) -> None:
        every = min(1.0, self.first_line_after, self.line_every) / 2
        while not self._stop.wait(every):
            with self._lock:
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
                        for source, (cpu, seen) in self._cpu.items()
                        if seen >= recent
                    ]
                    suffix = f" ({', '.join(waiting)})" if waiting and task.phase else ""
                    self._show(task, task.describe() + suffix)

"""The trainer's progress sink: long phases in the heartbeat, in log.txt and on stderr.

`PhaseReporter` is the `twotower.progress.Sink` a trainer installs. For every
open task (its own, or one relayed from its miner worker) it

- beats the heartbeat with the phase (the outermost task that names one:
  build-index, load-index, encode, search, evaluate, checkpoint, ...) and the
  innermost task's progress, whenever that progress advances or the worker's
  CPU time does; so the supervisor's watchdog sees a long build that makes
  progress as alive, and a stall (no progress, no CPU) as the hang it is;
- logs a line (log.txt and stderr, the logger's two handlers, so it shows
  without a terminal) through `twotower.progress.TaskLines`: when a set-up
  task starts, when any task has run for FIRST_LINE_AFTER seconds, then every
  LINE_EVERY seconds, and when a task that was shown ends.

Lines come from TaskLines' ticker thread, so they appear even while the main
thread sits in one long native call; heartbeats come only from the main
thread's evidence of progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from twotower.process.phase import Phase
from twotower.progress import FIRST_LINE_AFTER, LINE_EVERY, Task, TaskLines

BEAT_EVERY = 0.25  # at most this many seconds between heartbeats of advancing progress

Beat = Callable[[str, dict[str, Any]], None]  # (phase, extra heartbeat fields)


class PhaseReporter:
    """Progress sink of a trainer: beat(phase, fields) writes a heartbeat; lines go to `log`
    (`twotower.progress.TaskLines`, whose open tasks also name the phase).

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
        self.base_phase: str = Phase.LOAD
        self.lines = TaskLines(lambda line: log.info("%s", line), line_every, first_line_after)
        self._last_beat = 0.0

    @property
    def tasks(self) -> list[Task]:
        """The open tasks, outermost first."""
        return self.lines.tasks

    def enter(self, phase: str) -> None:
        """The trainer moves to `phase` (outside any task): beat it now."""
        self.base_phase = phase
        self._beat(force=True)

    def close(self) -> None:
        """Stop the lines' ticker thread."""
        self.lines.close()

    # --- the Sink protocol (main thread) -----------------------------------------------

    def start(self, task: Task) -> None:
        self.lines.start(task)
        self._beat(force=True)

    def advance(self, task: Task) -> None:
        self._beat(force=False)

    def end(self, task: Task) -> None:
        self.lines.end(task)
        self._beat(force=True)

    def alive(self, source: str, cpu_seconds: float) -> None:
        if self.lines.cpu_advanced(source, cpu_seconds):
            self._beat(force=False, cpu={"source": source, "cpu_s": round(cpu_seconds, 2)})

    # --- the heartbeat -------------------------------------------------------------------

    def phase(self) -> str:
        """The outermost open task that names a phase, else the base phase."""
        named = [task.name for task in self.tasks if task.phase]
        return named[0] if named else self.base_phase

    def _beat(self, force: bool, cpu: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_EVERY:
            return
        self._last_beat = now
        with self.lines.lock:
            fields: dict[str, Any] = {}
            if self.tasks:
                fields["progress"] = self.tasks[-1].summary()
            if cpu is not None:
                fields["waiting_on"] = cpu
            phase = self.phase()
        self.beat(phase, fields)

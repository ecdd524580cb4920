"""The trainer's phase points: each phase's heartbeat, the fault switch, and stop requests
(SIGINT / SIGTERM, or a supervisor that is gone)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from twotower.miners.base import Miner
from twotower.process import faults
from twotower.process.crash_dump import SUPERVISOR_PID_ENV
from twotower.process.phase import Phase
from twotower.progress import install as install_progress_sink
from twotower.run.heartbeat import Heartbeat
from twotower.training.phases import PhaseReporter

log = logging.getLogger("twotower")


def supervisor_pid() -> int | None:
    """The supervisor's pid its child was started with (None: not supervised)."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    return int(supervisor) if supervisor.isdigit() else None


class PhasePoints:
    """Where the trainer says which phase it is in, and learns whether to stop.

    heartbeat: the file beats go to; backend: the engine's name; miner: the configured
    miner's name, until `miner` holds the built chain (whose name changes on a switch).
    Installs itself as the progress sink (`phases.PhaseReporter`) until `close()`.
    """

    def __init__(self, heartbeat: Heartbeat, backend: str, miner: str):
        self.heartbeat = heartbeat
        self.backend = backend
        self.configured_miner = miner
        self.miner: Miner | None = None  # the mining chain, once built
        self.openmp: list[str] | None = None  # OpenMP runtimes here (None: unknown), for reports
        self.rss_kb = 0  # resident memory at the last phase point (the heartbeat's reading)
        self.stop_signal: int | None = None  # the stop request that arrived, if one did
        self._supervisor_pid = supervisor_pid()
        self.reporter = PhaseReporter(self._beat, log)
        install_progress_sink(self.reporter)

    @property
    def miner_name(self) -> str:
        """The name of the miner in use (the configured one before the chain is built)."""
        return self.miner.name if self.miner is not None else self.configured_miner

    def name_phase(self, phase: str) -> None:
        """Name `phase` in the heartbeat now (set-up's phases: no step, no fault point)."""
        self.reporter.enter(phase)

    def enter(self, phase: str, step: int) -> bool:
        """Enter `phase` at `step`: heartbeat, then the fault switch. True: poison the loss.

        The `mine` fault point is reached by the miner itself, in the process
        where it searches (its worker, when isolated), not here.
        """
        faults.set_step(step)
        self.reporter.enter(phase)
        if self._supervisor_pid not in (None, os.getppid()) and self.stop_signal is None:
            log.warning(
                "the supervisor (pid %s) is gone: stopping after this step", self._supervisor_pid
            )
            self.stop_signal = signal.SIGHUP
        if phase == Phase.MINE:
            return False
        return faults.point(phase, [self.backend, self.miner_name])

    def _beat(self, phase: str, fields: dict[str, Any]) -> None:
        """Write the heartbeat: `phase` at the current step, the engines, `fields` (progress)."""
        beat = self.heartbeat.beat(
            faults.current_step(),
            phase,
            backend=self.backend,
            miner=self.miner_name,
            openmp=self.openmp,
            **fields,
        )
        self.rss_kb = beat.rss_kb

    @contextmanager
    def stop_signals(self) -> Iterator[None]:
        """While inside: SIGINT and SIGTERM set `stop_signal`; a second one raises
        KeyboardInterrupt (stop now). The previous handlers come back on the way out."""

        def request_stop(signum: int, frame: FrameType | None) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt  # a second signal: stop now
            self.stop_signal = signum

        previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, request_stop)
            except ValueError:  # not the main thread: the caller handles signals
                break
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def close(self) -> None:
        """Stop reporting progress (the sink is uninstalled, the ticker ends)."""
        install_progress_sink(None)
        self.reporter.close()

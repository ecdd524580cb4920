"""Fault injection: `TWOTOWER_INJECT_FAULT=KIND@PHASE:STEP[:ENGINE][,...]`.

Real faults for rehearsing crashes: segv (a real segmentation fault through
ctypes), abort (os.abort), kill (SIGKILL to this process), hang (a stall that
only a watchdog ends), raise (a Python exception), nan (the step's loss
becomes NaN). PHASE is one of load, build-index, encode, mine, step,
checkpoint (build-index is reached by a miner's build, in its worker when
isolated, like mine by its search); STEP is
the number of training steps completed when the phase is reached (so
`segv@step:15` crashes the 16th update).

Without ENGINE a fault fires once per run: a marker file under the run
directory, written before it fires, keeps restarts from firing it again.
With ENGINE it fires whenever that engine (a backend or miner name) reaches
the point, like a deterministic bug in that engine.

The trainer reports progress with `set_step` and marks each phase point with
`point(phase, engines)`; miner worker processes do the same on their side.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from twotower.errors import UsageError
from twotower.process.phase import INJECTABLE

ENV_VAR = "TWOTOWER_INJECT_FAULT"
KINDS = ("segv", "abort", "kill", "hang", "raise", "nan")
PHASES = tuple(phase.value for phase in INJECTABLE)


class InjectedFault(RuntimeError):
    """The Python exception raised by the `raise` kind."""


@dataclass(frozen=True)
class Fault:
    """One armed fault: KIND at PHASE when STEP steps are done, optionally only in ENGINE."""

    kind: str
    phase: str
    step: int
    engine: str | None = None

    @classmethod
    def parse(cls, text: str) -> Fault:
        """'segv@step:15:torch-cpu' -> Fault. Raises UsageError naming what is wrong."""
        kind, at, rest = text.strip().partition("@")
        phase, _, rest = rest.partition(":")
        step_text, _, engine = rest.partition(":")
        problem = None
        if not at:
            problem = "expected KIND@PHASE:STEP[:ENGINE]"
        elif kind not in KINDS:
            problem = f"kind {kind!r} is not one of {', '.join(KINDS)}"
        elif phase not in PHASES:
            problem = f"phase {phase!r} is not one of {', '.join(PHASES)}"
        elif not step_text.isdigit():
            problem = f"step {step_text!r} is not a whole number"
        if problem:
            raise UsageError(f"{ENV_VAR}={text!r}: {problem}")
        return cls(kind, phase, int(step_text), engine or None)

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.phase}:{self.step}" + (f":{self.engine}" if self.engine else "")


def parse_faults(text: str | None) -> list[Fault]:
    """A comma-separated list of faults (empty or None: none)."""
    return [Fault.parse(part) for part in (text or "").split(",") if part.strip()]


def trigger(kind: str, label: str) -> bool:
    """Make the fault happen now. Returns True only for `nan` (the caller poisons its loss)."""
    if kind == "segv":
        ctypes.string_at(0)  # reads address 0: a real SIGSEGV
    elif kind == "abort":
        os.abort()
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        threading.Event().wait()
    elif kind == "raise":
        raise InjectedFault(f"injected fault {label}")
    return kind == "nan"


class FaultSwitch:
    """The faults armed in this process and where their fire-once markers live."""

    def __init__(self, faults: Sequence[Fault], marker_dir: Path | None):
        self.faults = list(faults)
        self.marker_dir = marker_dir
        self.step = 0

    def point(self, phase: str, engines: Sequence[str] = ()) -> bool:
        """A phase point. Fires the first matching fault; True means "poison the loss".

        The step compared is this thread's (`at_step`), else the switch's.
        """
        step = _thread_step(self.step)
        for fault in self.faults:
            if fault.phase != phase or fault.step != step:
                continue
            if fault.engine is not None:
                if fault.engine in engines:
                    return trigger(fault.kind, fault.label)
                continue
            if self._claim(fault):
                return trigger(fault.kind, fault.label)
        return False

    def _claim(self, fault: Fault) -> bool:
        """Record that a fire-once fault fires now; False if it fired before in this run."""
        if self.marker_dir is None:
            return True
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        marker = self.marker_dir / fault.label.replace(":", "_")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.fsync(fd)  # the marker must outlive the crash it announces
        os.close(fd)
        return True


_switch = FaultSwitch([], None)
_thread = threading.local()  # .step: a thread's own step (a mining running beside training)


def _thread_step(default: int) -> int:
    step: int | None = getattr(_thread, "step", None)
    return default if step is None else step


@contextmanager
def at_step(step: int) -> Iterator[None]:
    """Within this block, this thread's phase points and `current_step()` see `step`.

    A mining that runs in a thread beside training belongs to the step it was
    taken at, whatever step the training thread has reached meanwhile.
    """
    previous = getattr(_thread, "step", None)
    _thread.step = step
    try:
        yield
    finally:
        _thread.step = previous


def arm(marker_dir: Path | None, text: str | None = None) -> FaultSwitch:
    """Arm this process's switch from `text` (default: the environment variable)."""
    global _switch
    _switch = FaultSwitch(
        parse_faults(os.environ.get(ENV_VAR) if text is None else text), marker_dir
    )
    return _switch


def set_step(step: int) -> None:
    """Tell the switch how many training steps are complete."""
    _switch.step = step


def current_step() -> int:
    """This thread's `at_step` step, else the one last given to `set_step` (forwarded to
    miner workers)."""
    return _thread_step(_switch.step)


def marker_dir() -> Path | None:
    """Where this process's fire-once markers live (forwarded to miner workers)."""
    return _switch.marker_dir


def point(phase: str, engines: Sequence[str] = ()) -> bool:
    """Mark a phase point in this process; see FaultSwitch.point."""
    return _switch.point(phase, engines)

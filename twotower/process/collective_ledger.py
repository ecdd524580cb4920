"""Which collective each torchrun rank has reached: a per-rank counter that costs no system call.

A rank stuck outside a collective (a native stall, a deadlock, a slow disk) leaves
the others waiting in their next one until --collective-timeout; their collective
then fails, and by itself that error names no culprit. Each rank therefore counts
the collectives it enters and leaves in a small memory-mapped file beside its
heartbeat (`RUN/collectives-rankR.bin`: six int64, written in place, read by
anyone). When a rank's trainer fails, its guard reads every rank's ledger it can
see (the ranks of this machine; all of them on a shared file system) and
`laggards` names the ranks that never reached the collective this one was in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twotower.process import faults

# what each collective of a step is for; the ledger stores the index
KINDS = ("barrier", "flag", "gather", "gradients")
FIELDS = ("attempt", "entered", "left", "step", "kind", "since_ns")
ATTEMPT, ENTERED, LEFT, STEP, KIND, SINCE_NS = range(len(FIELDS))


def ledger_path(run_dir: Path, rank: int) -> Path:
    """Rank `rank`'s ledger file in run_dir."""
    return run_dir / f"collectives-rank{rank}.bin"


@dataclass(frozen=True)
class LedgerEntry:
    """One rank's ledger as read: the group attempt (torchrun's restart count + 1), the
    collectives entered and left, and of the last one entered its step, kind and wall
    time of entry (seconds since the epoch)."""

    attempt: int
    entered: int
    left: int
    step: int
    kind: str
    since: float

    @property
    def waiting(self) -> bool:
        """True while the rank is inside a collective."""
        return self.entered > self.left

    def as_dict(self) -> dict[str, Any]:
        """The entry as a JSON-ready object, with `waiting`."""
        return {**asdict(self), "waiting": self.waiting}

    def describe(self) -> str:
        """'in collective #12 (gradients, step 6) for 5.1 s' or 'between collectives; last
        entered #11 (gather, step 6)'."""
        if self.waiting:
            seconds = max(0.0, time.time() - self.since)
            return (
                f"in collective #{self.entered} ({self.kind}, step {self.step}) for {seconds:.1f} s"
            )
        return f"between collectives; last entered #{self.entered} ({self.kind}, step {self.step})"


class CollectiveLedger:
    """This rank's ledger, created (zeroed) at `path` for group attempt `attempt`.

    `with ledger.collective("gradients", step):` around every collective call.
    """

    def __init__(self, path: Path, attempt: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._counts = np.memmap(path, dtype=np.int64, mode="w+", shape=(len(FIELDS),))
        self._counts[ATTEMPT] = attempt

    @contextlib.contextmanager
    def collective(self, kind: str, step: int) -> Iterator[None]:
        """Count a collective of `kind` at `step` as entered, and as left once it returns
        (an exception leaves it entered: the rank never got out)."""
        counts = self._counts
        counts[STEP], counts[KIND], counts[SINCE_NS] = step, KINDS.index(kind), time.time_ns()
        counts[ENTERED] += 1
        yield
        counts[LEFT] += 1


def counted(ledger: CollectiveLedger | None, kind: str) -> contextlib.AbstractContextManager[None]:
    """`ledger.collective(kind, step)` at the trainer's current step; nothing without a ledger
    (one process, or a caller outside a run)."""
    if ledger is None:
        return contextlib.nullcontext()
    return ledger.collective(kind, faults.current_step())


def read_ledger(path: Path) -> LedgerEntry | None:
    """The ledger at `path`; None when it is missing or not a ledger (a rank not started
    on this machine, or its file cut short)."""
    try:
        counts = np.fromfile(path, dtype=np.int64)
    except OSError:
        return None
    if counts.shape != (len(FIELDS),) or not 0 <= counts[KIND] < len(KINDS):
        return None
    attempt, entered, left, step, kind, since_ns = (int(value) for value in counts)
    return LedgerEntry(attempt, entered, left, step, KINDS[kind], since_ns / 1e9)


def laggards(ledgers: dict[int, LedgerEntry], rank: int) -> list[int]:
    """The ranks of `ledgers` (rank -> entry) that never reached the collective `rank` is
    waiting in: same attempt, fewer collectives entered. Empty when `rank` was not
    waiting in a collective or its ledger is missing."""
    mine = ledgers.get(rank)
    if mine is None or not mine.waiting:
        return []
    return sorted(
        other
        for other, entry in ledgers.items()
        if other != rank and entry.attempt == mine.attempt and entry.entered < mine.entered
    )

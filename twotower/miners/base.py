"""The Miner protocol: nearest bank rows by inner product.

Every miner returns scores as dot products (q . bank[id]), best first, and
pads with id -1 (score -inf) when fewer than k rows exist. Conventions of
the libraries underneath (hnswlib's 'ip' space returns 1 - dot) are
converted inside each miner, never by its callers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from twotower.errors import TwotowerError
from twotower.process import faults
from twotower.process.phase import Phase

BUILD_FAULT_PHASE = Phase.BUILD_INDEX  # the fault point a miner's build reaches (where it builds)


@runtime_checkable
class Miner(Protocol):
    """A nearest-neighbour search over a frozen bank."""

    name: str

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        """Index bank (M, D) float32, usually a read-only memory map that must not be copied.

        `fingerprint` identifies the bank's content; miners that cache their
        index on disk key the cache by it (and by their own parameters).
        """

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, D) float32 -> (scores (N, k) float32, ids (N, k) int64), best first.

        Scores are dot products; rows with fewer than k neighbours pad with id -1.
        """


def check_miner(miner: Any, rows: int, dim: int) -> list[str]:
    """Ask `miner` whether it can index a bank of rows x dim before anything is built.

    Raises UsageError (one line, with the fix) for options that cannot work on
    such a bank; returns warnings worth logging. Miners without a `check` pass.
    """
    check = getattr(miner, "check", None)
    return list(check(rows, dim)) if check is not None else []


def raise_recall(miner: Any) -> dict[str, int]:
    """Ask `miner` to search wider for more recall (an approximate index doubles the search
    parameter it tuned); returns the new {parameter: value}, {} when it has nothing to raise."""
    method = getattr(miner, "raise_recall", None)
    return dict(method()) if method is not None else {}


def use_params(miner: Any, params: dict[str, int]) -> None:
    """Set `miner`'s tuned search parameters to recorded values (what `raise_recall` returned
    before: a resumed run searches as the run it continues did). Miners without them ignore it."""
    method = getattr(miner, "use_params", None)
    if method is not None and params:
        method(params)


class MinerCrashed(TwotowerError):
    """A miner's worker process died (a signal or an exit) or stopped answering.

    evidence: for a worker that died, what its crash report needs (`worker_death`); else None.
    """

    def __init__(self, miner: str, how: str, evidence: dict[str, Any] | None = None):
        super().__init__(f"miner {miner} crashed: {how}")
        self.miner = miner
        self.how = how
        self.evidence = evidence


class InProcessMiner:
    """An engine searched in this process; each search first reaches the fault point of
    `fault_phase` ("mine"; None for a miner that serves evaluation and must not fire it),
    and its build the point "build-index" (unless fault_phase is None).

    Isolated miners reach those points in their worker instead.
    """

    def __init__(self, engine: Miner, fault_phase: str | None = Phase.MINE):
        self.engine = engine
        self.name = engine.name
        self.fault_phase = fault_phase

    @property
    def build_info(self) -> dict[str, Any]:
        return dict(getattr(self.engine, "build_info", {}))

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        if self.fault_phase is not None:
            faults.point(BUILD_FAULT_PHASE, [self.name])
        self.engine.build(bank, fingerprint)

    def check(self, rows: int, dim: int) -> list[str]:
        """The engine's check of its options against a rows x dim bank (see `check_miner`)."""
        return check_miner(self.engine, rows, dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.fault_phase is not None:
            faults.point(self.fault_phase, [self.name])
        return self.engine.search(queries, k)

    def raise_recall(self) -> dict[str, int]:
        """The engine's `raise_recall` (see the module function)."""
        return raise_recall(self.engine)

    def use_params(self, params: dict[str, int]) -> None:
        """The engine's `use_params` (see the module function)."""
        use_params(self.engine, params)

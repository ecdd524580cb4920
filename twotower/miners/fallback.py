"""A chain of miners that survives a crashing one: restart it once, then use the next.

`FallbackMiner` is a Miner over names like ("faiss", "hnswlib", "exact"). When
the miner in use raises `MinerCrashed` (its worker died or hung), it is
restarted once (made anew: its index comes back from the cache) and the same
call is tried again; if that crashes too, the next name takes over and the
call is tried there. The caller never loses a search; only when the last name
crashes twice does the crash reach it. The restart budget is per call: a miner
that crashes once in a while is restarted each time, one that crashes twice in
a row is left.

Each crash, restart and switch is reported to `on_event` as a dict for the
trainer's metrics.jsonl: {"event": "crash", "miner", "step", "how", "next" (what happens
now: "restart faiss", "switch to hnswlib", "none: ..."), "worker" (the dead worker's
evidence for its crash report, `MinerCrashed.evidence`, None if none)},
{"event": "restart", "miner", "step"}, {"event": "switch", "miner" (the new
one), "step", "previous", "reason"}; step is `faults.current_step()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from twotower.miners.base import Miner, MinerCrashed, check_miner, raise_recall, use_params
from twotower.process import faults

log = logging.getLogger("twotower.miners")

Event = dict[str, Any]


class FallbackMiner:
    """A Miner that moves down `names` when the one in use crashes.

    make(name) -> a new Miner of that name (not yet built).
    on_event(dict) is called for each crash, restart and switch (default: logged as a warning).
    """

    def __init__(
        self,
        names: Sequence[str],
        make: Callable[[str], Miner],
        on_event: Callable[[Event], None] | None = None,
    ):
        if not names:
            raise ValueError("a miner chain needs at least one name")
        self.names = tuple(names)
        self._make = make
        self._on_event = on_event
        self._position = 0
        self.name = self.names[0]  # the miner in use
        self._miner: Miner | None = None
        self._bank: np.ndarray | None = None
        self._fingerprint: str | None = None
        self._params: dict[str, dict[str, int]] = {}  # search parameters set, by miner name

    @property
    def build_info(self) -> dict[str, Any]:
        """The build_info of the miner in use ({} before build)."""
        return dict(getattr(self._miner, "build_info", {}))

    def check(self, rows: int, dim: int) -> list[str]:
        """Every miner of the chain checks its options against a rows x dim bank before
        anything is built (`base.check_miner`): UsageError for one that cannot work, else
        the warnings. The miner in use is made now and kept for `build`."""
        warnings: list[str] = self._call(lambda miner: check_miner(miner, rows, dim))
        for name in self.names[self._position + 1 :]:
            later = self._make(name)
            try:
                warnings += check_miner(later, rows, dim)
            except MinerCrashed:
                pass  # a crash is the fallback's business when that miner takes over
            finally:
                close = getattr(later, "close", None)
                if close is not None:
                    close()
        return warnings

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        """Index bank (M, D) with the miner in use (the next ones build it when they take over)."""
        if self._bank is not None:  # a new bank: the miner in use starts over
            self.close()
        self._bank, self._fingerprint = bank, fingerprint
        checked = self._miner  # made by `check`, not built yet
        # a miner made from here on is built as it is made (`_current`)
        self._call(lambda miner: miner.build(bank, fingerprint) if miner is checked else None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, D) -> (scores (N, k) float32 dot products, ids (N, k) int64), best first.

        Raises MinerCrashed only when every miner of the chain has crashed on this call.
        """
        return self._call(lambda miner: miner.search(queries, k))

    def raise_recall(self) -> dict[str, int]:
        """The miner in use searches wider (`base.raise_recall`); a restarted or re-made
        miner of that name keeps the raised parameters."""
        params: dict[str, int] = self._call(raise_recall)
        self._params.setdefault(self.name, {}).update(params)
        return params

    def use_params(self, params: dict[str, int]) -> None:
        """Set the miner in use's recorded search parameters (`base.use_params`), kept for a
        restart of that miner."""
        self._params[self.name] = dict(params)
        self._call(lambda miner: use_params(miner, params))

    @property
    def search_params(self) -> dict[str, int]:
        """The search parameters raised or set for the miner in use ({} when none)."""
        return dict(self._params.get(self.name, {}))

    def close(self) -> None:
        """Stop the miner in use (its worker, if it has one)."""
        if self._miner is not None:
            close = getattr(self._miner, "close", None)
            if close is not None:
                close()
            self._miner = None

    def _call(self, call: Callable[[Miner], Any]) -> Any:
        restarted = False
        while True:
            try:
                return call(self._current())
            except MinerCrashed as crash:
                if not restarted:
                    plan = f"restart {self.name}"
                elif self._position + 1 < len(self.names):
                    plan = f"switch to {self.names[self._position + 1]}"
                else:
                    plan = f"none: {self.name}, the last miner of the chain, crashed twice"
                crashed = {"how": crash.how, "next": plan}
                self._report("crash", **crashed, worker=crash.evidence)
                self.close()  # a crashed worker is killed; its successor is made on the retry
                if not restarted:
                    restarted = True
                    self._report("restart")
                elif self._position + 1 < len(self.names):
                    previous = self.name
                    self._position += 1
                    self.name = self.names[self._position]
                    restarted = False
                    self._report("switch", previous=previous, reason=crash.how)
                else:
                    raise

    def _current(self) -> Miner:
        """The miner in use, made and built over the bank if it is new."""
        if self._miner is None:
            self._miner = self._make(self.name)
            if self._bank is not None:
                self._miner.build(self._bank, self._fingerprint)
                use_params(self._miner, self._params.get(self.name, {}))
        return self._miner

    def _report(self, event: str, **details: Any) -> None:
        record = {"event": event, "miner": self.name, "step": faults.current_step(), **details}
        if self._on_event is None:
            log.warning("miner event: %s", record)
        else:
            self._on_event(record)

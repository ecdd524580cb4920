"""Hard-negative refreshes: which rows each one mines, the steps it is taken at and put into
use, and its search running beside training.

Refresh k (k >= 1) serves steps [k E, (k + 1) E), E = mine_every. Its queries are
encoded at step take = k E - lead with the parameters after `take` steps; its table
is put into use at step use = k E (waiting for the search if it has not finished).
A refresh whose use step is not before the run's planned total is never taken: no
step would train on its table. Both steps follow from the config alone
(`MiningSchedule`), so whether the search ran beside training (`MiningJob` in a
thread) or at once, the table is the same, and so is every number after it. With scope
"upcoming" a refresh mines only the rows steps [use, use + E) train on; "all" mines every
training row.

A checkpoint written while a refresh is taken but not yet in use (take < step <=
use) stores its encoded queries (mined/queries-step-NNNNNNN.npy, named by the take
step) and names them in its meta; a resumed run searches them again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twotower import progress
from twotower.atomic import replace_file
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.errors import DataError
from twotower.miners.base import Miner
from twotower.process import faults
from twotower.training.batching import StepPlan
from twotower.training.checkpoint import step_dir_name
from twotower.training.negatives.mining import HardNegativeTable, MiningReport, mine_table

log = logging.getLogger("twotower")

# Queries per miner call, beside training or not (the same chunks give the same float32
# rounding either way); it bounds how long abandoning a background mining waits.
MINING_CHUNK = 4096


class MiningSchedule:
    """When each refresh is taken and used, and which rows it mines (see the module docstring)."""

    def __init__(self, plan: StepPlan, every: int, lead: int, scope: str, total: int):
        self.plan = plan
        self.every = every
        self.lead = lead
        self.scope = scope
        self.total = total

    @classmethod
    def of(cls, config: TrainConfig, plan: StepPlan, total: int) -> MiningSchedule:
        """The schedule of a run's config over its step plan of `total` planned steps."""
        return cls(plan, config.mine_every, config.mining_lead, config.mine_scope, total)

    def use_taken_at(self, step: int) -> int | None:
        """The use step of the refresh taken at `step` (steps done), None if none is."""
        use = step + self.lead
        return use if 0 < use < self.total and use % self.every == 0 else None

    def is_use(self, step: int) -> bool:
        """True when a refresh's table goes into use before step `step` trains."""
        return step > 0 and step % self.every == 0

    def in_flight_at(self, step: int) -> int | None:
        """The use step of the refresh taken but not yet in use when `step` steps are done
        (take < step <= use), None when there is none: what a checkpoint at `step` must keep."""
        use = -(-step // self.every) * self.every
        return use if 0 < use < self.total and use - self.lead < step else None

    def rows(self, use: int) -> np.ndarray:
        """Sorted dataset rows the refresh used at step `use` mines (n,) int64."""
        if self.scope == "all":
            return self.plan.train_rows
        return self.plan.rows_between(use, use + self.every)


@dataclass
class Refresh:
    """One refresh's inputs: taken at step `take`, used at `use`, the dataset `rows` (n,) it
    mines and their query vectors (n, D) float32; encode_seconds: what encoding them took."""

    take: int
    use: int
    rows: np.ndarray
    queries: np.ndarray
    encode_seconds: float = 0.0

    @property
    def queries_name(self) -> str:
        """The file name its queries are saved under in the run's mined/ directory."""
        return f"queries-{step_dir_name(self.take)}.npy"

    def save_queries(self, mined_dir: Path) -> str:
        """Write the queries to mined_dir (atomically, once); returns the file name."""
        path = mined_dir / self.queries_name
        if not path.exists():
            queries = np.ascontiguousarray(self.queries, dtype=np.float32)
            replace_file(path, lambda file: np.save(file, queries), durable=True)
        return self.queries_name

    def meta(self) -> dict[str, Any]:
        """What a checkpoint's meta.json records of this refresh in flight."""
        return {"take": self.take, "use": self.use, "queries": self.queries_name}


@dataclass
class Mined:
    """A finished refresh: its table, the filters' report, the search's and the probe's cost,
    and the recall probe (None when the miner is exact or the probe is off)."""

    table: HardNegativeTable
    report: MiningReport
    miner: str
    search_seconds: float
    probe: ProbeResult | None


@dataclass(frozen=True)
class ProbeResult:
    """Recall@k of a miner against exact search on `queries` sampled queries, and its cost."""

    recall: float
    k: int
    queries: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as the `mined` metrics event carries them."""
        return {
            "recall": round(self.recall, 4),
            "recall_k": self.k,
            "probe_queries": self.queries,
            "probe_seconds": round(self.seconds, 3),
        }


def probe_rows(n: int, size: int) -> np.ndarray:
    """The probe's sample of a refresh's n queries: `size` evenly spaced indices (fewer if n is)."""
    return np.unique(np.linspace(0, n - 1, num=min(size, n)).astype(np.int64)) if n else np.empty(0)


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k ids (n, k) (-1 padding ignored) that `found`
    (n, k) also returns."""
    shares = []
    for got, want in zip(found, exact, strict=True):
        want = want[want >= 0]
        if len(want):
            shares.append(len(np.intersect1d(got, want)) / len(want))
    return float(np.mean(shares)) if shares else 1.0


def is_approximate(miner: str, faiss_index: str) -> bool:
    """True for a miner whose answers may miss true neighbours (hnswlib, faiss but Flat)."""
    return miner == "hnswlib" or (miner == "faiss" and faiss_index != "Flat")


def probe_recall(miner: Miner, exact: Miner, queries: np.ndarray, k: int) -> ProbeResult:
    """Search queries (p, D) with `miner` and with the exact miner; recall@k of the first."""
    started = time.perf_counter()
    _, found = miner.search(queries, k)
    _, truth = exact.search(queries, k)
    return ProbeResult(recall_at(found, truth), k, len(queries), time.perf_counter() - started)


class Abandoned(Exception):
    """A background mining was abandoned (the run stopped first); its result is not wanted."""


class _Abandonable:
    """A miner that refuses further searches once `flag` is set (between chunks of a mining)."""

    def __init__(self, miner: Miner, flag: threading.Event):
        self._miner, self._flag = miner, flag

    @property
    def name(self) -> str:
        """The name of the miner in use (a fallback chain changes it on a switch)."""
        return self._miner.name

    @name.setter
    def name(self, value: str) -> None:
        raise AttributeError("the name is the wrapped miner's")

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        self._miner.build(bank, fingerprint)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._flag.is_set():
            raise Abandoned
        return self._miner.search(queries, k)


def run_refresh(
    refresh: Refresh,
    miner: Miner,
    exact: Miner | None,
    dataset: Dataset,
    config: TrainConfig,
) -> Mined:
    """Mine `refresh` with `miner` (its fault points at the take step); probe recall against
    `exact` on config.mine_probe of its queries when the miner in use is approximate."""
    with faults.at_step(refresh.take):
        started = time.perf_counter()
        table, report = mine_table(
            miner, refresh.queries, dataset, refresh.rows, config, chunk_size=MINING_CHUNK
        )
        searched = time.perf_counter() - started
        probe = None
        if (
            exact is not None
            and config.mine_probe
            and is_approximate(miner.name, config.faiss_index)
        ):
            sample = refresh.queries[probe_rows(len(refresh.queries), config.mine_probe)]
            depth = min(config.mine_skip + config.mine_pool, len(dataset.bank))
            probe = probe_recall(miner, exact, sample, depth)
    return Mined(table, report, miner.name, searched, probe)


class MiningJob:
    """`run_refresh` of one refresh, in a daemon thread (background) or at once.

    At once, an exception of the mining is raised by the constructor, where the
    refresh is taken. In the background it is raised by result(), which waits for
    the mining and returns (Mined, seconds waited). abandon() stops a background
    mining after its current miner call and waits for that.
    """

    def __init__(
        self,
        refresh: Refresh,
        work: Callable[[Refresh, Miner], Mined],
        miner: Miner,
        background: bool,
    ):
        self.refresh = refresh
        self._abandon = threading.Event()
        self._outcome: Mined | BaseException | None = None
        self._thread: threading.Thread | None = None
        guarded = _Abandonable(miner, self._abandon)
        if not background:
            self._outcome = work(refresh, guarded)
            return
        self._thread = threading.Thread(
            target=self._run,
            args=(work, guarded),
            name=f"twotower-mine-{refresh.use}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, work: Callable[[Refresh, Miner], Mined], miner: Miner) -> None:
        try:
            with progress.details_only():  # training's phase stays training's
                self._outcome = work(self.refresh, miner)
        except BaseException as error:  # handed to the training thread by result()
            self._outcome = error

    def result(self) -> tuple[Mined, float]:
        """(the finished refresh, seconds this call waited for it); re-raises its exception.

        While it waits nothing beats the heartbeat but the mining's own progress and its
        worker's CPU time (relayed through `progress`), so a stalled search is still a hang.
        """
        started = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        waited = time.perf_counter() - started
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome, waited

    def abandon(self) -> None:
        """Stop the mining after its current miner call and wait for that; a failure of the
        mining (no longer needed) is logged, not raised."""
        self._abandon.set()
        if self._thread is not None:
            self._thread.join()
        if isinstance(self._outcome, BaseException) and not isinstance(self._outcome, Abandoned):
            log.warning(
                "the mining taken at step %d failed before it was needed (%s: %s); "
                "a resumed run mines it again",
                self.refresh.take,
                type(self._outcome).__name__,
                self._outcome,
            )


def load_refresh(meta: dict[str, Any], mined_dir: Path, schedule: MiningSchedule) -> Refresh:
    """The refresh a checkpoint's meta records in flight, its queries read back from mined_dir.

    Raises DataError when the queries file is missing or is not the rows' (n, D) float32.
    """
    take, use = int(meta["take"]), int(meta["use"])
    rows = schedule.rows(use)
    path = mined_dir / meta["queries"]
    try:
        queries = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError(
            f"{path}: the queries of the mining in flight are unreadable ({error})"
        ) from None
    if queries.ndim != 2 or len(queries) != len(rows) or queries.dtype != np.float32:
        raise DataError(
            f"{path}: {queries.shape} {queries.dtype} are not the ({len(rows)}, D) float32 "
            f"queries of the mining used at step {use}"
        )
    return Refresh(take, use, rows, np.asarray(queries))


def describe_miner(miner: str, faiss_index: str) -> str:
    """'faiss IVF4096,Flat', 'hnswlib', 'exact'."""
    return f"faiss {faiss_index}" if miner == "faiss" else miner


def describe_refresh(refresh: Refresh, mined: Mined, waited: float, config: TrainConfig) -> str:
    """The log line of a refresh put into use: what was mined, with what, its cost and recall."""
    engine = describe_miner(mined.miner, config.faiss_index)
    line = (
        f"mined {mined.report.queries:,} queries with {engine} "
        f"in {mined.search_seconds:.1f} s (encoded at step {refresh.take} in "
        f"{refresh.encode_seconds:.1f} s, waited {waited:.1f} s)"
    )
    probe = mined.probe
    if probe is not None:
        line += (
            f", recall@{probe.k} {probe.recall:.2f} vs exact on {probe.queries}, "
            f"probe {probe.seconds:.1f} s"
        )
    return line


def recall_warning(probe: ProbeResult, config: TrainConfig, miner: str) -> str | None:
    """The warning for a probe below --min-mining-recall (saying what to raise), else None."""
    if probe.recall >= config.min_mining_recall:
        return None
    return (
        f"mining recall@{probe.k} {probe.recall:.2f} vs exact is below --min-mining-recall "
        f"{config.min_mining_recall:g}: {recall_advice(miner, config.faiss_index)}"
    )


def recall_advice(miner: str, faiss_index: str) -> str:
    """What to raise for more recall from `miner` (a faiss factory string says which index)."""
    if miner == "hnswlib":
        return (
            "raise --hnswlib-ef (candidates per search) or --hnswlib-m / --hnswlib-ef-construction"
        )
    if "IVF" in faiss_index:
        return "raise --faiss-nprobe (IVF lists searched per query) or use fewer lists"
    if "HNSW" in faiss_index:
        return "raise --faiss-ef-search (candidates per search) or --faiss-ef-construction"
    return "use a more exact index (--faiss-index Flat is exact)"

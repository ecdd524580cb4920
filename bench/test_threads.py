"""The thread budget: a trainer's step time while its miner worker searches, with and without
the split of `twotower.process.threads`.

The trainer (torch-cpu, GRU B=32 T=10 D=H=768 K=8 Q=4096, in this process) steps while an
isolated miner (faiss Flat, else exact, in its worker) searches 256 queries for their top 64
over a 50k x 768 memory-mapped bank in a loop: mining overlapped with training. Cases, side by
side in one run:

- trainer alone, with every core and with its share of the budget (the context);
- both busy, no budget: trainer and worker each with every core (each library's default);
- both busy, the budget: the overlapped split (1 + 1 on 2 cores).

Each row also reports the searches per second the worker finished meanwhile, since a split
that only starved the miner would not be a gain.

    pytest bench/test_threads.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench.report import RatioReport
from twotower import Batch, backends, miners
from twotower.process.threads import limit_threads, thread_budget, usable_cores

B, T, D, H, K, Q, M = 32, 10, 768, 768, 8, 4096, 50_000
QUERIES, TOP = 256, 64
ROUNDS = 8
MINER = "faiss" if "faiss" in miners.available() else "exact"

REPORT_TITLE = f"threads: torch-cpu GRU step while a {MINER} worker searches (B=32 D=H=768)"

pytestmark = pytest.mark.skipif(
    "torch-cpu" not in backends.available(), reason="the trainer side needs torch"
)


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.npy"
    rng = np.random.default_rng(0)
    bank = np.lib.format.open_memmap(path, "w+", np.float32, (M, D))
    for start in range(0, M, 10_000):
        rows = rng.standard_normal((min(10_000, M - start), D), dtype=np.float32)
        bank[start : start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    bank.flush()
    return path


@pytest.fixture(scope="module")
def batch() -> Batch:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((B + B * K + Q, D), dtype=np.float32)
    return Batch(
        contexts=rng.standard_normal((B, T, D), dtype=np.float32),
        lengths=np.full(B, T, dtype=np.int64),
        positive_ids=np.arange(B, dtype=np.int64),
        positive_vecs=vectors[:B],
        hard_ids=np.arange(B, B + B * K, dtype=np.int64).reshape(B, K),
        hard_vecs=vectors[B : B + B * K].reshape(B, K, D),
        queue_ids=np.arange(B + B * K, B + B * K + Q, dtype=np.int64),
        queue_vecs=vectors[B + B * K :],
    )


@dataclass
class SearchRate:
    """Searches a worker finished while a block ran, and the block's seconds."""

    searches: int = 0
    seconds: float = 0.0

    def per_second(self) -> float:
        """Searches finished per second."""
        return self.searches / self.seconds if self.seconds else 0.0


@contextlib.contextmanager
def searching(bank: np.ndarray, threads: int | None, cache_dir: Path) -> Iterator[SearchRate]:
    """While entered, a miner worker searches in a loop, driven from a thread here that
    only waits on the worker's pipe; the SearchRate yielded is filled in on exit."""
    miner = miners.get(MINER, isolation="process", threads=threads, cache_dir=cache_dir)
    miner.build(bank)
    queries = np.ascontiguousarray(bank[:QUERIES])
    miner.search(queries, TOP)  # warm: the index and the bank's pages
    rate, stop = SearchRate(), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            miner.search(queries, TOP)
            rate.searches += 1

    thread = threading.Thread(target=loop, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        yield rate
    finally:
        rate.seconds = time.perf_counter() - started
        stop.set()
        thread.join()
        miner.close()


@pytest.fixture
def trainer_threads() -> Iterator[None]:
    """Restore this process's thread pools to every core after a case limited them."""
    yield
    limit_threads(usable_cores())


CASES = {
    "trainer alone, every core": "alone",
    "trainer alone, its share": "alone-split",
    "both busy, no budget": "none",
    "both busy, the budget": "split",
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_time_while_a_worker_searches(
    benchmark,
    report: RatioReport,
    bank_file: Path,
    batch: Batch,
    tmp_path: Path,
    trainer_threads: None,
    case: str,
) -> None:
    cores = usable_cores()
    budget = thread_budget(cores, miner_in_worker=True, overlapped=True)
    mode = CASES[case]
    trainer = budget.trainer if mode.endswith("split") else cores
    limit_threads(trainer)
    engine = backends.get("torch-cpu", tower="gru", dim=D, hidden=H, layers=1)
    bank = np.load(bank_file, mmap_mode="r")
    if mode.startswith("alone"):
        benchmark.pedantic(lambda: engine.step(batch), rounds=ROUNDS, warmup_rounds=1)
        baseline = "trainer alone, every core" if mode == "alone-split" else None
        report.add(case, benchmark, baseline=baseline, trainer_threads=trainer)
        return
    worker_threads = budget.miner if mode == "split" else None
    with searching(bank, worker_threads, tmp_path) as rate:
        benchmark.pedantic(lambda: engine.step(batch), rounds=ROUNDS, warmup_rounds=1)
    report.add(
        case,
        benchmark,
        baseline="both busy, no budget" if mode == "split" else "trainer alone, every core",
        trainer_threads=trainer,
        worker_threads=worker_threads or cores,
        searches_per_s=f"{rate.per_second():.2f}",
    )

"""ExactMiner equals a float64 brute force up to ties, in every blocking it can choose.

Also: a memory-mapped bank is used in place (never copied), the block plan
fits its budget, bad input is refused, and tests/neighbours.py's comparison
fails when it must (its negative controls live here too).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.neighbours import assert_same_neighbours, brute_force, neighbour_disagreement
from twotower import miners, progress
from twotower.miners.exact import (
    BYTES_PER_KEPT,
    BYTES_PER_SCORE,
    MAX_BUDGET,
    TILE,
    ExactMiner,
    default_memory_budget,
    plan_blocks,
)

# float32 GEMM against float64 over D <= 32 unit-normal terms: errors near 1e-6
ATOL = 1e-4


def random_case(rows: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bank (rows, dim), queries (queries, dim)) float32, standard normal."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((rows, dim), dtype=np.float32)
    return bank, rng.standard_normal((queries, dim), dtype=np.float32)


def with_duplicates(rows: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bank of `rows` rows drawn from 40 distinct ones: every score is tied many times."""
    distinct, query_vecs = random_case(40, dim, queries, seed)
    picks = np.random.default_rng(seed + 1).integers(0, 40, size=rows)
    return distinct[picks], query_vecs


def ascending(rows: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries near one direction over a bank sorted worst to best along it.

    Each bank block then beats the last, so every block has many candidates.
    """
    bank, noise = random_case(rows, dim, queries, seed)
    direction = np.ones(dim, dtype=np.float32)
    bank = bank[np.argsort(bank @ direction)]
    return bank, direction + 0.3 * noise


# name: (bank and queries, k, memory budget); M = 3000 is not a whole number of tiles
CASES = {
    "few candidates per block": (random_case(3000, 32, 70, 0), 10, None),
    "k large next to the block (whole-row selection)": (random_case(3000, 32, 70, 1), 50, None),
    "duplicated rows (ties)": (with_duplicates(600, 16, 30, 2), 15, None),
    "duplicated rows over several blocks": (with_duplicates(5000, 16, 40, 8), 20, 340_000),
    "bank in ascending order (many candidates every block)": (
        ascending(5000, 16, 40, 9),
        20,
        340_000,
    ),
    "k > M (padding)": (random_case(7, 8, 5, 3), 12, None),
    "tiny budget: one query, one tile at a time": (random_case(300, 16, 9, 4), 6, 1024),
    "chunks that do not divide N, many blocks": (random_case(6000, 16, 37, 5), 8, 340_000),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_brute_force_up_to_ties(case: str) -> None:
    (bank, queries), k, budget = CASES[case]
    miner = ExactMiner(memory_budget_bytes=budget)
    miner.build(bank)
    scores, ids = miner.search(queries, k)

    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert_same_neighbours(scores, ids, *brute_force(bank, queries, k), atol=ATOL)
    # each score is the dot product of its own id
    real = ids >= 0
    dots = np.einsum("nd,nkd->nk", queries.astype(np.float64), bank[np.maximum(ids, 0)])
    np.testing.assert_allclose(scores[real], dots[real], atol=ATOL, rtol=0)


def test_the_cases_force_the_blocking_they_name() -> None:
    (bank, queries), k, budget = CASES["tiny budget: one query, one tile at a time"]
    miner = ExactMiner(memory_budget_bytes=budget)
    miner.build(bank)
    assert miner.plan(len(queries), k) == (1, TILE)

    (bank, queries), k, budget = CASES["chunks that do not divide N, many blocks"]
    miner = ExactMiner(memory_budget_bytes=budget)
    miner.build(bank)
    chunk, block = miner.plan(len(queries), k)
    assert 1 < chunk < len(queries) and len(queries) % chunk != 0
    assert len(bank) / block > 4


def test_memory_mapped_bank_is_searched_in_place(tmp_path: Path) -> None:
    bank, queries = random_case(20_000, 64, 16, 6)
    np.save(tmp_path / "bank.npy", bank)
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    miner = ExactMiner(memory_budget_bytes=256 << 10)
    miner.build(mapped)
    assert miner.bank is mapped

    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        scores, ids = miner.search(queries, 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < mapped.nbytes / 4, (
        f"search allocated {peak} bytes for a {mapped.nbytes}-byte bank"
    )
    assert_same_neighbours(scores, ids, *brute_force(bank, queries, 10), atol=ATOL)


def test_plan_fits_the_budget_and_never_holds_n_by_m() -> None:
    n, m, k = 771_000, 771_000, 101
    for budget in (1 << 20, 64 << 20, MAX_BUDGET):
        chunk, block = plan_blocks(n, m, k, budget)
        assert block % TILE == 0
        assert chunk * (block * BYTES_PER_SCORE + k * BYTES_PER_KEPT) <= budget
    assert plan_blocks(n, m, k, 10) == (1, TILE)  # the smallest plan, whatever the budget
    assert plan_blocks(3, 5, 2, MAX_BUDGET) == (3, TILE)  # a tiny search is one step
    assert 0 < default_memory_budget() <= MAX_BUDGET


def test_registry_returns_an_exact_miner() -> None:
    miner = miners.get("exact", memory_budget_bytes=1 << 20)
    assert isinstance(miner, miners.Miner) and miner.name == "exact"
    assert isinstance(miners.engine("exact"), ExactMiner)


def test_empty_searches_and_bad_input() -> None:
    bank, queries = random_case(50, 8, 4, 7)
    miner = ExactMiner()
    with pytest.raises(RuntimeError, match="before build"):
        miner.search(queries, 3)
    with pytest.raises(ValueError, match="float32"):
        miner.build(bank.astype(np.float64))
    miner.build(bank)
    scores, ids = miner.search(queries, 0)
    assert scores.shape == ids.shape == (4, 0)
    scores, ids = miner.search(queries[:0], 3)
    assert scores.shape == ids.shape == (0, 3)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        miner.search(queries[:, :4], 3)
    poisoned = queries.copy()
    poisoned[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        miner.search(poisoned, 3)


def test_neighbour_comparison_tolerates_ties_and_fails_otherwise() -> None:
    ref_scores = np.array([[5.0, 4.0, 4.0, 3.0, 2.0, 2.0]])
    ref_ids = np.array([[10, 11, 12, 13, 14, 15]])

    def compare(scores: list[float], ids: list[int]) -> str | None:
        return neighbour_disagreement(
            np.array([scores]), np.array([ids]), ref_scores, ref_ids, atol=1e-6
        )

    assert compare([5, 4, 4, 3, 2, 2], [10, 12, 11, 13, 14, 15]) is None  # a tie in another order
    assert compare([5, 4, 4, 3, 2, 2], [10, 11, 12, 13, 15, 99]) is None  # the cut-off group split
    # negative controls
    assert compare([5, 4, 4, 3, 2, 2], [10, 11, 13, 12, 14, 15]) is not None  # ids swapped across
    assert compare([5, 4, 4, 3, 2, 2], [10, 11, 12, 99, 14, 15]) is not None  # a wrong id
    assert compare([5, 4, 4, 3.1, 2, 2], [10, 11, 12, 13, 14, 15]) is not None  # a wrong score
    assert compare([5, 4, 4, 3, 2, 2], [10, 11, 11, 13, 14, 15]) is not None  # a repeated id
    padded_scores = np.array([[5.0, 4.0, -np.inf]])
    padded_ids = np.array([[10, 11, -1]])
    assert (
        neighbour_disagreement(padded_scores, padded_ids, padded_scores, padded_ids, 1e-6) is None
    )
    # a row that is not full holds every row of the bank: its last group must match too
    assert (
        neighbour_disagreement(
            padded_scores, np.array([[10, 12, -1]]), padded_scores, padded_ids, 1e-6
        )
        is not None
    )
    assert (
        neighbour_disagreement(
            padded_scores, np.array([[10, 11, 12]]), padded_scores, padded_ids, 1e-6
        )
        is not None
    )


class _Events:
    """A progress sink that keeps (event, task name, done, total)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, int | None]] = []

    def start(self, task: progress.Task) -> None:
        self.events.append(("start", task.name, task.done, task.total))

    def advance(self, task: progress.Task) -> None:
        self.events.append(("advance", task.name, task.done, task.total))

    def end(self, task: progress.Task) -> None:
        self.events.append(("end", task.name, task.done, task.total))

    def alive(self, source: str, cpu_seconds: float) -> None:
        """Unused here."""


def test_a_search_reports_its_blocks_as_one_progress_task() -> None:
    """Progress has one mechanism (`twotower.progress`): whoever installed the sink decides
    what to show (the trainer's log, a command's stderr lines, a worker's pipe)."""
    rng = np.random.default_rng(0)
    miner = ExactMiner(memory_budget_bytes=256 << 10)
    miner.build(rng.standard_normal((5000, 16)).astype(np.float32))
    events = _Events()
    previous = progress.install(events)
    try:
        miner.search(rng.standard_normal((300, 16)).astype(np.float32), 10)
    finally:
        progress.install(previous)
    (first, *_, last) = events.events
    assert first[:2] == ("start", "search") and last[:2] == ("end", "search")
    assert last[2] == last[3] and last[3] > 1  # every block counted

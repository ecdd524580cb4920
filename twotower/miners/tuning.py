"""Tuning an approximate index's search parameter to a recall target, against exact search.

After an index is built, the search parameter the user left unset (faiss IVF nprobe, faiss
HNSW efSearch, hnswlib ef) is chosen as the smallest power of two whose recall@TUNE_K,
on TUNE_QUERIES seeded bank rows searched as queries, reaches the target: exact search
(`ExactMiner`) gives the truth. A refresh's recall probe may later find the training
queries harder than bank rows; `raised` gives the next value to try then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from twotower import progress
from twotower.miners.exact import ExactMiner

TUNE_QUERIES = 64  # bank rows searched to choose the parameter
TUNE_K = 32
MAX_EF = 4096  # the most a tuned HNSW candidate list grows to


@dataclass(frozen=True)
class Tuned:
    """The parameter chosen (`name`, `value`) and the recall it reached on `queries` rows."""

    name: str
    value: int
    recall: float
    queries: int

    def as_dict(self) -> dict[str, Any]:
        """The build_info fields: {"tuned": "nprobe", "nprobe": 4, "tuned_recall": ...}."""
        return {
            "tuned": self.name,
            self.name: self.value,
            "tuned_recall": round(self.recall, 4),
            "tune_queries": self.queries,
        }


def recall_of(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k ids `truth` (n, k) that `found` (n, k) also holds."""
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth, strict=True))
    return hits / truth.size if truth.size else 1.0


def tune(
    name: str,
    search: Callable[[int, np.ndarray, int], np.ndarray],
    bank: np.ndarray,
    target: float,
    start: int,
    limit: int,
    seed: int,
) -> Tuned:
    """The smallest power of two from `start` (at most `limit`) at which search(value,
    queries (n, D), k) -> ids (n, k) reaches recall `target` against exact, on seeded rows
    of `bank` (M, D) as queries; `limit` when none does."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(bank), size=min(TUNE_QUERIES, len(bank)), replace=False))
    queries = np.ascontiguousarray(bank[rows], dtype=np.float32)  # (n, D)
    k = min(TUNE_K, len(bank))
    with progress.task(
        "tune-index",
        f"{name} for recall {target} on {len(rows)} bank rows",
        phase=False,
        announce=True,
    ):
        exact = ExactMiner()
        exact.build(bank)
        truth = exact.search(queries, k)[1]  # (n, k)
        value = start
        while True:
            recall = recall_of(search(value, queries, k), truth)
            if recall >= target or value >= limit:
                return Tuned(name, value, recall, len(rows))
            value = raised(value, limit)


def raised(value: int, limit: int) -> int:
    """The next value to try for more recall: twice `value`, at most `limit`."""
    return min(2 * value, limit)

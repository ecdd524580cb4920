"""The hnswlib miner: an HNSW graph in hnswlib's 'ip' space, run in this process.

hnswlib's 'ip' space reports a distance of 1 - dot; `scores_from_distances`
turns it back into the dot product, the one place that convention is undone.
The graph is filled in row chunks, stored in the index cache and read back on
the next run (hnswlib reads it into memory: it cannot map a saved index).

hnswlib is imported when an HnswlibMiner is made, never when this module is.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import numpy as np

from twotower.config import DEFAULT_TARGET_RECALL
from twotower.miners.index_cache import IndexCache, add_in_chunks
from twotower.miners.tuning import MAX_EF, TUNE_K, raised, tune

DEFAULT_EF = 128  # the search ef where neither the user nor a recall target sets one


def scores_from_distances(distances: np.ndarray) -> np.ndarray:
    """hnswlib 'ip' distances (N, k) = 1 - dot -> dot products (N, k) float32."""
    return (1.0 - distances).astype(np.float32, copy=False)


class HnswlibMiner:
    """Nearest bank rows by inner product through an hnswlib HNSW graph.

    M: graph degree; ef_construction: candidate list length while building;
    ef: candidate list length while searching (hnswlib uses max(ef, k)); None: with
    target_recall, the smallest power of two reaching it after the build (`tuning`), else 128.
    threads: hnswlib's threads for add and search (None: all cores).
    cache_dir: where built graphs are stored (None: rebuilt every time); seed: the graph's.
    """

    name = "hnswlib"

    def __init__(
        self,
        M: int = 16,
        ef_construction: int = 200,
        ef: int | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        seed: int = 100,
        target_recall: float | None = DEFAULT_TARGET_RECALL,
    ):
        import hnswlib

        self._hnswlib = hnswlib
        self.M = M
        self.ef_construction = ef_construction
        self.ef = ef
        self.threads = -1 if threads is None else threads
        self.cache = IndexCache(cache_dir)
        self.seed = seed
        self.target_recall = target_recall
        self.tuned: str | None = None  # "ef" once tuned to target_recall
        self._index: Any = None
        self.build_info: dict[str, Any] = {}

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        """Index bank (M, D) float32; `fingerprint` keys the cache (None: hash the bank)."""
        key: dict[str, Any] = {"M": self.M, "ef_construction": self.ef_construction}
        key.update(seed=self.seed, hnswlib=importlib.metadata.version("hnswlib"))
        path = self.cache.path(bank, fingerprint, self.name, key)
        rows, dim = bank.shape
        index, info = self.cache.load_or_build(
            path,
            lambda: self._build(bank),
            lambda index, filename: index.save_index(filename),
            lambda filename: self._load(filename, dim, rows),
            f"hnswlib M={self.M} ef_construction={self.ef_construction} over {rows:,} x {dim} "
            "bank rows",
        )
        index.set_num_threads(self.threads)
        self._index = index
        self.build_info = info.as_dict()
        if self.ef is None and self.target_recall is not None:
            self.build_info.update(self._tune(index, bank))
        index.set_ef(self.ef or DEFAULT_EF)
        self.build_info["params"] = {
            "M": int(index.M),
            "ef_construction": int(index.ef_construction),
            "ef": int(index.ef),
        }

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, D) -> (scores (N, k) float32 dot products, ids (N, k) int64), best first.

        With fewer than k rows in the bank, the rest of each row is id -1, score -inf.
        """
        if self._index is None:
            raise RuntimeError("HnswlibMiner.search before build")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = min(k, self._index.element_count)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if found and len(queries):
            labels, distances = self._index.knn_query(queries, k=found)
            scores[:, :found] = scores_from_distances(distances)
            ids[:, :found] = labels.astype(np.int64)
        return scores, ids

    def raise_recall(self) -> dict[str, int]:
        """Twice the tuned ef (at most MAX_EF), for when a refresh's probe measured recall below
        the target; {} when ef was not tuned or is at its limit."""
        if self.tuned is None or self._index is None or self.ef is None:
            return {}
        value = raised(self.ef, MAX_EF)
        if value == self.ef:
            return {}
        self.use_params({"ef": value})
        return {"ef": value}

    def use_params(self, params: dict[str, int]) -> None:
        """Set the tuned ef to a recorded value ({"ef": 256}: a resumed run's)."""
        if "ef" in params:
            self.ef = params["ef"]
            self._index.set_ef(self.ef)

    def _tune(self, index: Any, bank: np.ndarray) -> dict[str, Any]:
        """Set ef to the smallest power of two reaching target_recall (`tuning.tune`)."""

        def search(value: int, queries: np.ndarray, k: int) -> np.ndarray:
            index.set_ef(value)
            return index.knn_query(queries, k=k)[0]  # type: ignore[no-any-return]

        found = tune("ef", search, bank, self.target_recall or 0.0, TUNE_K, MAX_EF, self.seed + 1)
        self.ef, self.tuned = found.value, "ef"
        return found.as_dict()

    def _build(self, bank: np.ndarray) -> Any:
        index = self._hnswlib.Index(space="ip", dim=bank.shape[1])
        index.init_index(
            max_elements=len(bank),
            M=self.M,
            ef_construction=self.ef_construction,
            random_seed=self.seed,
        )
        add_in_chunks(
            lambda chunk, start: index.add_items(
                np.ascontiguousarray(chunk, dtype=np.float32),
                np.arange(start, start + len(chunk)),
                num_threads=self.threads,
            ),
            bank,
            f"hnswlib M={self.M}",
        )
        return index

    def _load(self, filename: str, dim: int, rows: int) -> Any:
        index = self._hnswlib.Index(space="ip", dim=dim)
        index.load_index(filename, max_elements=rows)
        return index

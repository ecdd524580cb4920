"""The faiss miner: any index factory string over inner product, run in this process.

"Flat" builds nothing: it searches the bank itself with `faiss.knn` (the same
blocked GEMM + heap as IndexFlatIP), so a memory-mapped bank is never copied.
Any other factory string ("HNSW32", "IVF4096,Flat", "IVF1024,PQ64", ...) is
trained on a seeded sample of the bank when it needs training, filled in row
chunks, stored in the index cache and read back with faiss' in-place mapping
(IO_FLAG_MMAP_IFC), so its vectors are file-backed pages, not a second copy.

faiss is imported when a FaissMiner is made, never when this module is; in the
trainer it is made only inside a worker process (see `isolation`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from twotower.errors import UsageError
from twotower.miners.index_cache import BuildInfo, IndexCache, add_in_chunks

DEFAULT_NPROBE = 32  # IVF lists visited per query when the index has lists
DEFAULT_EF_SEARCH = 128  # HNSW candidate list length when the index has a graph
MIN_TRAIN_ROWS = 10_000
TRAIN_ROWS_PER_LIST = 40  # faiss warns below 39 training points per IVF centroid


class FaissMiner:
    """Nearest bank rows by inner product through a faiss index.

    index: a faiss index factory string, built with METRIC_INNER_PRODUCT.
    nprobe / ef_search: search-time IVF lists and HNSW efSearch (None: 32 / 128
    where the index has them; set on an index without them is a UsageError).
    ef_construction: HNSW efConstruction while building (None: faiss' 40; more
    buys recall on large banks for build time).
    threads: faiss' OpenMP threads (None: faiss' default).
    cache_dir: where built indexes are stored (None: rebuilt every time).
    train_rows: rows sampled for training (None: max(10k, 40 per IVF list)); seed: that sample's.
    """

    name = "faiss"

    def __init__(
        self,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        ef_construction: int | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        train_rows: int | None = None,
        seed: int = 0,
    ):
        import faiss

        self._faiss = faiss
        self.index_spec = index
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.cache = IndexCache(cache_dir)
        self.train_rows = train_rows
        self.seed = seed
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        self._bank: np.ndarray | None = None
        self._index: Any = None
        self.build_info: dict[str, Any] = {}

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        """Index bank (M, D) float32; `fingerprint` keys the cache (None: hash the bank)."""
        self._bank, self._index = None, None
        if self.index_spec == "Flat":
            self._bank = np.ascontiguousarray(bank, dtype=np.float32)  # a memory map stays one
            self.build_info = BuildInfo("direct", 0.0).as_dict()
            return
        key = {"index": self.index_spec, "train_rows": self.train_rows, "seed": self.seed}
        key.update(ef_construction=self.ef_construction, faiss=self._faiss.__version__)
        path = self.cache.path(bank, fingerprint, self.name, key)
        index, info = self.cache.load_or_build(
            path, lambda: self._build(bank), self._faiss.write_index, self._read
        )
        if info.source == "built" and info.path is not None:
            index = self._read(info.path)  # drop the built copy for file-backed pages
        self._configure(index)
        self._index = index
        self.build_info = info.as_dict()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, D) -> (scores (N, k) float32 dot products, ids (N, k) int64), best first."""
        if self._bank is None and self._index is None:
            raise RuntimeError("FaissMiner.search before build")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._index is None:
            assert self._bank is not None
            scores, ids = self._faiss.knn(
                queries, self._bank, k, metric=self._faiss.METRIC_INNER_PRODUCT
            )
        else:
            scores, ids = self._index.search(queries, k)
        ids = ids.astype(np.int64, copy=False)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX
        return scores, ids

    def _build(self, bank: np.ndarray) -> Any:
        faiss = self._faiss
        try:
            index = faiss.index_factory(bank.shape[1], self.index_spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise UsageError(
                f"faiss cannot make index {self.index_spec!r}: {error_line(error)}"
            ) from None
        if self.ef_construction is not None:
            self._set(index, "efConstruction", self.ef_construction, required=True)
        if not index.is_trained:
            index.train(self._training_sample(bank, index))
        add_in_chunks(
            lambda chunk, _start: index.add(np.ascontiguousarray(chunk, dtype=np.float32)),
            bank,
            f"faiss {self.index_spec}",
        )
        return index

    def _training_sample(self, bank: np.ndarray, index: Any) -> np.ndarray:
        """A seeded sample of bank rows in file order (sorted reads from a memory map)."""
        ivf = self._faiss.try_extract_index_ivf(index)
        lists = ivf.nlist if ivf else 0
        wanted = self.train_rows or max(MIN_TRAIN_ROWS, TRAIN_ROWS_PER_LIST * lists)
        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.choice(len(bank), size=min(wanted, len(bank)), replace=False))
        return np.ascontiguousarray(bank[rows], dtype=np.float32)

    def _read(self, filename: str) -> Any:
        faiss = self._faiss
        return faiss.read_index(filename, getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))

    def _configure(self, index: Any) -> None:
        """Set nprobe / efSearch: the user's where given, the defaults where the index has them."""
        nprobe, ef_search = self.nprobe, self.ef_search
        self._set(index, "nprobe", nprobe or DEFAULT_NPROBE, required=nprobe is not None)
        self._set(index, "efSearch", ef_search or DEFAULT_EF_SEARCH, required=ef_search is not None)

    def _set(self, index: Any, param: str, value: int, required: bool) -> None:
        """Set `param`; where the index has no such parameter, a UsageError if `required`."""
        try:
            self._faiss.ParameterSpace().set_index_parameter(index, param, value)
        except RuntimeError:
            if required:
                raise UsageError(
                    f"faiss index {self.index_spec!r} has no {param} parameter"
                ) from None


def error_line(error: BaseException) -> str:
    """The last line of a faiss error (its C++ message, without the file and line)."""
    return str(error).strip().splitlines()[-1]

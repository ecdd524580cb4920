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

import math
import os
import re
from typing import Any

import numpy as np

from twotower import progress
from twotower.config import DEFAULT_TARGET_RECALL
from twotower.errors import UsageError
from twotower.miners.index_cache import BuildInfo, IndexCache, add_in_chunks
from twotower.miners.tuning import MAX_EF, TUNE_K, raised, tune

DEFAULT_NPROBE = 32  # IVF lists visited per query when the index has lists
DEFAULT_EF_SEARCH = 128  # HNSW candidate list length when the index has a graph
MIN_TRAIN_ROWS = 10_000
TRAIN_ROWS_PER_LIST = 40  # faiss warns below 39 training points per IVF centroid
FAISS_MIN_ROWS_PER_LIST = 39  # below this faiss' k-means warns and clusters poorly
IVF_LISTS = re.compile(r"IVF\d+")


def lists_that_fit(rows: int) -> int:
    """An IVF list count for a bank of `rows`: about 4 sqrt(rows), a power of two, with at
    least FAISS_MIN_ROWS_PER_LIST rows per list (1 for a tiny bank)."""
    wanted = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
    while wanted > 1 and wanted * FAISS_MIN_ROWS_PER_LIST > rows:
        wanted //= 2
    return wanted


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
    target_recall: the search parameter the user left unset (IVF nprobe, HNSW efSearch) is
    chosen after the build as the smallest power of two whose recall@32 against exact, on
    seeded bank rows (`tuning`), reaches it (`build_info` holds the value and recall found;
    None: the fixed defaults 32 / 128).
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
        target_recall: float | None = DEFAULT_TARGET_RECALL,
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
        self.target_recall = target_recall
        self.tuned: str | None = None  # the search parameter tuned to target_recall, if any
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
        rows, dim = bank.shape
        what = f"faiss {self.index_spec} over {rows:,} x {dim} bank rows"
        index, info = self.cache.load_or_build(
            path, lambda: self._build(bank), self._faiss.write_index, self._read, what
        )
        if info.source == "built" and info.path is not None:
            index = self._read(info.path)  # drop the built copy for file-backed pages
        self._configure(index)
        self._index = index
        self.build_info = info.as_dict()
        if self.target_recall is not None:
            self.build_info.update(self._tune(index, bank))
        self.build_info["params"] = self.index_params()

    def index_params(self) -> dict[str, int]:
        """The built index's parameters as faiss holds them: nlist and nprobe (IVF), M,
        efSearch and efConstruction (HNSW); {} for Flat or before build."""
        if self._index is None:
            return {}
        faiss = self._faiss
        params: dict[str, int] = {}
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            params.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
        hnsw = getattr(faiss.downcast_index(self._index), "hnsw", None)
        if hnsw is not None:
            params.update(
                M=int(hnsw.nb_neighbors(1)),
                efSearch=int(hnsw.efSearch),
                efConstruction=int(hnsw.efConstruction),
            )
        return params

    def check(self, rows: int, dim: int) -> list[str]:
        """Refuse, before anything is built, what cannot work on a bank of rows x dim.

        A factory string faiss cannot parse, IVF lists outside the bank's rows or
        --faiss-train-rows, and a parameter the index does not have are UsageErrors
        naming the fix; fewer than FAISS_MIN_ROWS_PER_LIST rows per list is a
        warning (returned). Makes the empty index only: no training, no vectors.
        """
        spec = self.index_spec
        if spec == "Flat":
            given = [
                flag
                for flag, value in (
                    ("--faiss-nprobe", self.nprobe),
                    ("--faiss-ef-search", self.ef_search),
                    ("--faiss-ef-construction", self.ef_construction),
                    ("--faiss-train-rows", self.train_rows),
                )
                if value is not None
            ]
            if given:
                raise UsageError(
                    f"--faiss-index Flat searches the bank as it is: it has no "
                    f"{', '.join(given)}; drop them or choose an index such as "
                    f"IVF{lists_that_fit(rows)},Flat or HNSW32"
                )
            return []
        index = self._make_index(dim)
        warnings = []
        ivf = self._faiss.try_extract_index_ivf(index)
        if ivf is not None:
            lists, fits = ivf.nlist, lists_that_fit(rows)
            fix = "--faiss-index " + IVF_LISTS.sub(f"IVF{fits}", spec, count=1)
            if lists > rows:
                raise UsageError(
                    f"--faiss-index {spec}: {lists:,} IVF lists need at least {lists:,} bank "
                    f"rows to train ({FAISS_MIN_ROWS_PER_LIST} per list to train well), but the "
                    f"bank has {rows:,}; use {fix} (about 4 sqrt(rows), "
                    f"{FAISS_MIN_ROWS_PER_LIST}+ rows per list)"
                )
            if self.train_rows is not None and self.train_rows < lists:
                raise UsageError(
                    f"--faiss-train-rows {self.train_rows:,} is fewer than the {lists:,} IVF "
                    f"lists of {spec}; give at least {FAISS_MIN_ROWS_PER_LIST * lists:,}"
                )
            if rows < FAISS_MIN_ROWS_PER_LIST * lists:
                warnings.append(
                    f"--faiss-index {spec}: {rows:,} bank rows are fewer than "
                    f"{FAISS_MIN_ROWS_PER_LIST} per IVF list; k-means will cluster poorly "
                    f"(consider {fix})"
                )
        if self.ef_construction is not None:
            self._set(index, "efConstruction", self.ef_construction, required=True)
        self._configure(index)
        return warnings

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

    def _tune(self, index: Any, bank: np.ndarray) -> dict[str, Any]:
        """Tune the search parameter the user left unset (IVF nprobe, else HNSW efSearch) to
        target_recall (`tuning.tune`); returns what was chosen ({} when nothing was unset)."""
        faiss = self._faiss
        ivf = faiss.try_extract_index_ivf(index)
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if ivf is not None and self.nprobe is None:
            param, start, limit = "nprobe", 1, int(ivf.nlist)
        elif hnsw is not None and self.ef_search is None:
            param, start, limit = "efSearch", TUNE_K, MAX_EF  # faiss searches max(efSearch, k)
        else:
            return {}

        def search(value: int, queries: np.ndarray, k: int) -> np.ndarray:
            faiss.ParameterSpace().set_index_parameter(index, param, value)
            return index.search(queries, k)[1]  # type: ignore[no-any-return]

        found = tune(param, search, bank, self.target_recall or 0.0, start, limit, self.seed + 1)
        if param == "nprobe":
            self.nprobe = found.value
        else:
            self.ef_search = found.value
        self.tuned = param
        return found.as_dict()

    def raise_recall(self) -> dict[str, int]:
        """Twice the tuned search parameter (at most all lists / MAX_EF), for when a refresh's
        probe measured recall below the target; {} when none was tuned or it is at its limit."""
        if self.tuned is None or self._index is None:
            return {}
        if self.tuned == "nprobe":
            lists = int(self._faiss.try_extract_index_ivf(self._index).nlist)  # type: ignore[union-attr]
            current, limit = self.nprobe or DEFAULT_NPROBE, lists
        else:
            current, limit = self.ef_search or DEFAULT_EF_SEARCH, MAX_EF
        value = raised(current, limit)
        if value == current:
            return {}
        self.use_params({self.tuned: value})
        return {self.tuned: value}

    def use_params(self, params: dict[str, int]) -> None:
        """Set tuned search parameters to recorded values ({"nprobe": 8}: a resumed run's)."""
        for param, value in params.items():
            if param not in ("nprobe", "efSearch"):
                continue  # another engine's (a chain that switched engines)
            self._faiss.ParameterSpace().set_index_parameter(self._index, param, value)
            if param == "nprobe":
                self.nprobe = value
            else:
                self.ef_search = value

    def _make_index(self, dim: int) -> Any:
        """The empty index of the factory string; UsageError when faiss cannot parse it."""
        faiss = self._faiss
        try:
            return faiss.index_factory(dim, self.index_spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise UsageError(
                f"--faiss-index {self.index_spec}: faiss cannot make this index "
                f"({error_line(error)}); see the faiss wiki's 'The index factory' "
                "(e.g. Flat, HNSW32, IVF1024,Flat, IVF1024,PQ64)"
            ) from None

    def _build(self, bank: np.ndarray) -> Any:
        index = self._make_index(bank.shape[1])
        if self.ef_construction is not None:
            self._set(index, "efConstruction", self.ef_construction, required=True)
        if not index.is_trained:
            sample = self._training_sample(bank, index)
            what = f"k-means of {self.index_spec} on {len(sample):,} sampled rows"
            with progress.task("train-index", what, phase=False, announce=True):
                index.train(sample)
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
                flag = {"nprobe": "--faiss-nprobe", "efSearch": "--faiss-ef-search"}.get(
                    param, "--faiss-ef-construction"
                )
                raise UsageError(
                    f"--faiss-index {self.index_spec} has no {param} parameter: drop {flag} "
                    "(nprobe is for IVF indexes, efSearch and efConstruction for HNSW)"
                ) from None


def error_line(error: BaseException) -> str:
    """The message of a faiss error: its last line, without "Error in FUNCTION at FILE:LINE: "."""
    line = str(error).strip().splitlines()[-1]
    return line.rsplit(": ", 1)[-1] if line.startswith("Error in ") else line

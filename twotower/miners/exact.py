"""Exact inner-product search over a bank that may not fit in memory twice: `ExactMiner`.

The oracle the approximate miners are tested against and the engine evaluation
uses. It keeps a reference to the bank (usually a read-only memory map) and
reads it one block of rows at a time, never copying it whole. The work is
split into query chunks and bank blocks sized from the memory available
(`plan_blocks`), so the scores held at once are chunk x block, never N x M.

Scores come from a float32 GEMM, so "exact" means exact up to float32
rounding: two rows whose float64 scores differ by less than that may swap.
The bank must be finite (twotower.data validates it); queries are checked.

Selection is kept cheap next to the GEMM (2 D flops per score): each block's
scores are reduced to one maximum per (query, tile of TILE columns), a single
pass over memory, and only tiles whose maximum beats both the query's current
k-th best score and the k-th largest tile maximum of the block are read again.
That is about k tiles in the first block and fewer after, so selection costs
little more than the one pass; rows where many tiles qualify (k large next to
the block, ties, a bank sorted worst to best) fall back to argpartition.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from twotower import progress
from twotower.process.memory import available_bytes
from twotower.process.phase import Phase

TILE = 32  # columns per tile; bank blocks are whole tiles
MAX_QUERY_CHUNK = 4096
MAX_BANK_BLOCK = 16384
WIDE_BLOCK = 1024  # a tight budget takes fewer queries before it narrows blocks below this
# Peak bytes per score of a (chunk, block) step: the float32 score itself plus the
# worst case of the selection workspace (a dense row group's copy and argpartition
# indices, or a sparse block's gathered tiles, candidate coordinates and padding).
BYTES_PER_SCORE = 32
BYTES_PER_KEPT = 48  # per query and kept neighbour: running top-k and its merge workspace
DENSE_TILE_FRACTION = 4  # a row with over 1/4 of its tiles worth a look is selected whole
MAX_BUDGET = 1 << 30  # larger blocks buy no speed
ASSUMED_FLOPS = 30e9  # what --miner auto assumes an exact search runs at (miners/auto.py)


def default_memory_budget() -> int:
    """Bytes a search may use for scores and selection: a quarter of what is available, capped."""
    return max(TILE * BYTES_PER_SCORE, min(MAX_BUDGET, available_bytes() // 4))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_blocks(n_queries: int, n_rows: int, k: int, budget_bytes: int) -> tuple[int, int]:
    """(query_chunk, bank_block) for searching n_queries over n_rows, keeping k, in budget_bytes.

    bank_block is a multiple of TILE, and chunk x (block x BYTES_PER_SCORE +
    k x BYTES_PER_KEPT) stays within the budget, except that the smallest plan
    is one query by one tile whatever the budget. A tight budget narrows the
    block down to WIDE_BLOCK first, then takes fewer queries, then narrows the
    block further: the GEMM stays efficient while both sides are a few hundred.
    """
    target_chunk = max(1, min(n_queries, MAX_QUERY_CHUNK))
    widest = min(MAX_BANK_BLOCK, _round_up(max(n_rows, 1), TILE))
    fitting = budget_bytes // (target_chunk * BYTES_PER_SCORE) // TILE * TILE
    block = min(widest, max(WIDE_BLOCK, fitting))
    chunk = budget_bytes // (block * BYTES_PER_SCORE + k * BYTES_PER_KEPT)
    if chunk < 1:
        one_query = (budget_bytes - k * BYTES_PER_KEPT) // BYTES_PER_SCORE // TILE * TILE
        block, chunk = min(widest, max(TILE, one_query)), 1
    return min(target_chunk, chunk), block


class _RunningTopK:
    """The best k (score, id) pairs seen so far for each of n queries, unordered within a row."""

    def __init__(self, n: int, k: int):
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)
        # the k-th best score per row: a candidate must beat it to count
        self.kth = np.full(n, -np.inf, dtype=np.float32)

    def merge(self, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Offer candidates scores/ids (h, w) to rows (h,); pad unused slots with -inf / -1."""
        k = self.scores.shape[1]
        pooled_scores = np.concatenate((self.scores[rows], scores), axis=1)
        pooled_ids = np.concatenate((self.ids[rows], ids), axis=1)
        best = np.argpartition(pooled_scores, -k, axis=1)[:, -k:]
        kept = np.take_along_axis(pooled_scores, best, axis=1)
        self.scores[rows] = kept
        self.ids[rows] = np.take_along_axis(pooled_ids, best, axis=1)
        self.kth[rows] = kept.min(axis=1)

    def ranked(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k), ids (n, k)) best first, equal scores by id; -inf slots get id -1."""
        order = np.lexsort((self.ids, -self.scores), axis=-1)
        scores = np.take_along_axis(self.scores, order, axis=1)
        ids = np.take_along_axis(self.ids, order, axis=1)
        ids[scores == -np.inf] = -1
        return scores, ids

    def offer_block(self, scores: np.ndarray, offset: int) -> None:
        """Offer scores (n, width) of bank rows offset .. offset + width, width a multiple of TILE.

        Tile j holds columns j, j + tiles, j + 2 * tiles, ...: strided tiles make
        the per-tile maximum a vectorised reduction over the middle axis.
        """
        n, width = scores.shape
        k = self.scores.shape[1]
        tiles = width // TILE
        tiled = scores.reshape(n, TILE, tiles)
        tile_max = tiled.max(axis=1)  # (n, tiles)
        # the lowest score that beats the k-th best so far (ties with it are not taken)
        floor = np.nextafter(self.kth, np.float32(np.inf))
        hot = tile_max >= floor[:, None]
        if tiles > k:
            crowded = np.flatnonzero(np.count_nonzero(hot, axis=1) > k)
            if crowded.size:
                # a score below the k-th largest tile maximum has k better ones in this block
                crowded_max = tile_max[crowded]
                kth_tile_max = np.partition(crowded_max, tiles - k, axis=1)[:, tiles - k]
                floor[crowded] = np.maximum(floor[crowded], kth_tile_max)
                hot[crowded] = crowded_max >= floor[crowded, None]
        hot_rows, hot_tiles = np.nonzero(hot)
        if hot_rows.size == 0:
            return
        dense = np.bincount(hot_rows, minlength=n) * DENSE_TILE_FRACTION > tiles
        if dense.any():
            self._offer_whole_rows(scores, np.flatnonzero(dense), offset)
            sparse = ~dense[hot_rows]
            hot_rows, hot_tiles = hot_rows[sparse], hot_tiles[sparse]
        if hot_rows.size == 0:
            return
        values = tiled[hot_rows, :, hot_tiles]  # (hot tiles, TILE)
        which, position = np.nonzero(values >= floor[hot_rows, None])
        rows = hot_rows[which]  # ascending, as np.nonzero walks rows in order
        columns = position * tiles + hot_tiles[which]
        self._merge_ragged(rows, values[which, position], columns + offset)

    def _offer_whole_rows(self, scores: np.ndarray, rows: np.ndarray, offset: int) -> None:
        """Offer each row's top k of the block, a quarter of the chunk's rows at a time."""
        width = scores.shape[1]
        keep = min(self.scores.shape[1], width)
        group = max(1, len(self.kth) // DENSE_TILE_FRACTION)
        for start in range(0, len(rows), group):
            part_rows = rows[start : start + group]
            part = scores[part_rows]
            columns = np.argpartition(part, width - keep, axis=1)[:, width - keep :]
            self.merge(part_rows, np.take_along_axis(part, columns, axis=1), columns + offset)

    def _merge_ragged(self, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Offer candidates given as parallel (c,) arrays, rows ascending, padded per row."""
        unique_rows, starts, counts = np.unique(rows, return_index=True, return_counts=True)
        which = np.repeat(np.arange(len(unique_rows)), counts)
        slot = np.arange(len(rows)) - np.repeat(starts, counts)
        padded_scores = np.full((len(unique_rows), counts.max()), -np.inf, dtype=np.float32)
        padded_ids = np.full(padded_scores.shape, -1, dtype=np.int64)
        padded_scores[which, slot] = scores
        padded_ids[which, slot] = ids
        self.merge(unique_rows, padded_scores, padded_ids)


class ExactMiner:
    """Exact top-k by inner product: blocked float32 GEMM with a running top-k per query.

    memory_budget_bytes: what a search may use for scores and selection (default:
    a quarter of MemAvailable, at most 1 GiB; 256 MiB where that is unknown).
    Each search is the "search" progress task (`twotower.progress`), counted in blocks.
    threads: accepted like the other miners' option and ignored; numpy's BLAS takes its
    thread count from OPENBLAS_NUM_THREADS at import.
    """

    name = "exact"

    def __init__(
        self,
        memory_budget_bytes: int | None = None,
        threads: int | None = None,
    ):
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
        self.memory_budget_bytes = memory_budget_bytes
        self.bank: np.ndarray | None = None

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        """Keep a reference to bank (M, D) float32; no index, so `fingerprint` is unused."""
        if bank.ndim != 2 or bank.dtype != np.float32:
            raise ValueError(f"bank must be (M, D) float32, got {bank.shape} {bank.dtype}")
        self.bank = bank

    def plan(self, n_queries: int, k: int) -> tuple[int, int]:
        """(query_chunk, bank_block) a search of n_queries for k neighbours would use."""
        if self.bank is None:
            raise RuntimeError("ExactMiner.plan called before build")
        budget = self.memory_budget_bytes or default_memory_budget()
        return plan_blocks(n_queries, len(self.bank), k, budget)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, D) -> (scores (N, k) float32 dot products, ids (N, k) int64), best first.

        Equal scores are ordered by id; when k > M the rows end in id -1, score -inf.
        """
        if self.bank is None:
            raise RuntimeError("ExactMiner.search called before build")
        bank = self.bank
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
            raise ValueError(f"queries must be (N, {bank.shape[1]}), got {queries.shape}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if not np.isfinite(queries).all():
            raise ValueError("queries contain NaN or inf")
        n, m = len(queries), len(bank)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or k == 0 or m == 0:
            return scores, ids
        chunk, block = self.plan(n, k)
        steps = -(-n // chunk) * -(-m // block)
        what = f"exact top-{k} of {n:,} queries over {m:,} x {bank.shape[1]} bank rows"
        with progress.task(Phase.SEARCH, what, steps, "blocks") as task:
            for start in range(0, n, chunk):
                part = slice(start, start + chunk)
                top = self._search_chunk(
                    np.ascontiguousarray(queries[part]), k, block, task.advance
                )
                scores[part], ids[part] = top.ranked()
        return scores, ids

    def _search_chunk(
        self, queries: np.ndarray, k: int, block: int, tick: Callable[[], None]
    ) -> _RunningTopK:
        """The running top-k of queries (n, D) after every bank block has been offered;
        tick() after each block."""
        bank = self.bank
        assert bank is not None
        n = len(queries)
        top = _RunningTopK(n, k)
        buffer = np.empty(n * block, dtype=np.float32)
        for offset in range(0, len(bank), block):
            rows = bank[offset : offset + block]
            real = len(rows)
            width = _round_up(real, TILE)
            if width != real:  # the last block: pad to whole tiles (at most `block` rows copied)
                rows = np.concatenate((rows, np.zeros((width - real, bank.shape[1]), np.float32)))
            scores = buffer[: n * width].reshape(n, width)
            np.matmul(queries, rows.T, out=scores)
            scores[:, real:] = -np.inf
            top.offer_block(scores, offset)
            tick()
        return top

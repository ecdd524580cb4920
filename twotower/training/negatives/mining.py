"""Hard negatives: mined from any Miner into a table, sampled each step, saved with the run.

`mine_hard_negatives` asks a miner for each training query's nearest bank rows
and keeps a window of ranks as that query's pool; `HardNegativeTable` holds
the pools, one row per training sample, and draws the K ids a step uses;
`MiningReport` says what one mining kept and skipped (one metrics.jsonl object).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from twotower.atomic import replace_file
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.errors import DataError
from twotower.miners.base import Miner

DEFAULT_CHUNK = 16384  # queries per miner call; bounds its results and the positives gathered


@dataclass
class HardNegativeTable:
    """Each training sample's pool of hard-negative bank ids: ids (N, pool) int64, -1 padded.

    Row i belongs to training sample i; valid ids come first, best ranked first.
    """

    ids: np.ndarray  # (N, pool) int64

    @classmethod
    def empty(cls, num_samples: int, pool: int = 0) -> HardNegativeTable:
        """The table before the first mining: (num_samples, pool), all -1, so every draw is -1."""
        return cls(np.full((num_samples, pool), -1, dtype=np.int64))

    @property
    def pool(self) -> int:
        """Ids kept per sample (the table's width)."""
        return int(self.ids.shape[1])

    def sample(self, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """rows (B,) sample indices -> (B, k) int64: k ids per row drawn without replacement.

        Draws only from the row's ids other than -1, uniformly; a row with fewer
        than k pads with -1. The same rng state gives the same draw, and the
        rng advances by B x pool numbers whatever the table holds.
        """
        pools = self.ids[np.asarray(rows, dtype=np.int64)]  # (B, pool)
        drawn = np.full((len(pools), k), -1, dtype=np.int64)
        # a uniform random key per slot; sorting by it shuffles each row, -1 slots last
        keys = rng.random(pools.shape)
        keys[pools < 0] = np.inf
        order = np.argsort(keys, axis=1)[:, :k]
        drawn[:, : order.shape[1]] = np.take_along_axis(pools, order, axis=1)
        return drawn

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ids to path (.npy) atomically: a temporary file, fsynced, then renamed."""
        ids = np.asarray(self.ids, dtype=np.int64)
        replace_file(Path(path), lambda file: np.save(file, ids), durable=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HardNegativeTable:
        """A table saved by `save`, memory-mapped read-only. Raises DataError if it is not one."""
        try:
            ids = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a hard-negative table ({error}); mine again") from error
        if ids.ndim != 2 or ids.dtype != np.int64:
            raise DataError(
                f"{path}: a hard-negative table is (N, pool) int64, found {ids.shape} {ids.dtype}; "
                "mine again"
            )
        return cls(ids)


@dataclass(frozen=True)
class MiningReport:
    """What one mining kept and skipped. A candidate failing several filters counts under each."""

    queries: int  # queries mined
    skip: int
    pool: int
    candidates: int  # ids in the rank windows, before the filters
    dropped_absolute_margin: int
    dropped_relative_margin: int
    dropped_max_score: int
    dropped: int  # candidates dropped by at least one filter
    positives_found: int  # queries whose positive was among the miner's results
    seen_removed: int  # the query's own context items among the miner's results, set aside
    short_queries: int  # queries left with fewer than `pool` negatives
    negatives: int  # ids kept in the table

    def as_dict(self) -> dict[str, int]:
        """The report as one flat JSON-ready object, for metrics.jsonl."""
        return asdict(self)


_COUNTED = tuple(f.name for f in fields(MiningReport) if f.name not in ("queries", "skip", "pool"))


def mine_hard_negatives(
    miner: Miner,
    queries: np.ndarray,
    positive_ids: np.ndarray,
    bank: np.ndarray,
    skip: int,
    pool: int,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    seen: np.ndarray | None = None,
) -> tuple[HardNegativeTable, MiningReport]:
    """Mine each query's hard negatives with a miner already built on bank.

    queries (N, D) float32, positive_ids (N,) int64 rows of bank (M, D) ->
    (table with ids (N, pool), report). The miner is asked for the top
    skip + pool + 1 ids per query: one more than the window needs, so that
    removing the positive (when it is among them) never leaves a row short.
    With the positive removed, ranks [skip, skip + pool) form the window.

    seen (N, T) int64, -1 padded (--exclude-context): each query's own context
    ids, removed like the positive before the window is counted (the loss masks
    them anyway, so a slot spent on one would be a wasted negative); the miner
    is then asked for T more ids.

    The filters apply after the window, to its candidates: one is dropped if
    its score exceeds positive_score - absolute_margin, or
    positive_score * (1 - relative_margin), or max_score, where positive_score
    = queries[i] . bank[positive_ids[i]]. A dropped candidate is not replaced
    from further down, so every kept id has its rank in the window and a
    filtered row comes up short (counted in the report). Queries go to the
    miner chunk_size at a time, so memory stays bounded for any N.
    """
    queries = np.asarray(queries)
    positive_ids = np.asarray(positive_ids)
    _check_arguments(queries, positive_ids, bank, skip, pool, relative_margin, chunk_size)
    if seen is not None and (seen.ndim != 2 or len(seen) != len(queries)):
        raise ValueError(f"seen must be ({len(queries)}, T), got {seen.shape}")
    extra = 0 if seen is None else seen.shape[1]
    n = len(queries)
    table = np.full((n, pool), -1, dtype=np.int64)
    counts = Counter(dict.fromkeys(_COUNTED, 0))
    quiet = True if n <= chunk_size else None  # None: a bar on a terminal only
    with tqdm(total=n, desc="mining", unit="query", disable=quiet) as bar:
        for start in range(0, n, chunk_size):
            part = slice(start, start + chunk_size)
            chunk = np.ascontiguousarray(queries[part], dtype=np.float32)
            positives = positive_ids[part].astype(np.int64)
            scores, ids = miner.search(chunk, skip + pool + 1 + extra)
            positive_scores = np.einsum("nd,nd->n", chunk, bank[positives], dtype=np.float64)
            ceilings = _filter_ceilings(
                positive_scores, absolute_margin, relative_margin, max_score
            )
            own = None if seen is None else np.asarray(seen[part], dtype=np.int64)
            table[part] = _window(scores, ids, positives, own, ceilings, skip, pool, counts)
            bar.update(len(chunk))
    return HardNegativeTable(table), MiningReport(queries=n, skip=skip, pool=pool, **counts)


def _window(
    scores: np.ndarray,
    ids: np.ndarray,
    positives: np.ndarray,
    seen: np.ndarray | None,
    ceilings: dict[str, np.ndarray],
    skip: int,
    pool: int,
    counts: Counter[str],
) -> np.ndarray:
    """Table rows (n, pool) from a miner's answer (n, skip + pool + 1 [+ T]); seen (n, T) or
    None: ids removed like the positive; adds to counts."""
    is_positive = ids == positives[:, None]
    negative = ~is_positive & (ids >= 0)
    if seen is not None:
        is_seen = negative & (ids[:, :, None] == seen[:, None, :]).any(axis=2)
        counts["seen_removed"] += int(np.count_nonzero(is_seen))
        negative &= ~is_seen
    rank = np.cumsum(negative, axis=1) - 1  # rank among the negatives
    kept = negative & (rank >= skip) & (rank < skip + pool)
    dropped = np.zeros_like(kept)
    for name, ceiling in ceilings.items():
        over = kept & (scores > ceiling[:, None])
        counts[name] += int(np.count_nonzero(over))
        dropped |= over
    counts["positives_found"] += int(np.count_nonzero(is_positive.any(axis=1)))
    counts["candidates"] += int(np.count_nonzero(kept))
    counts["dropped"] += int(np.count_nonzero(dropped))
    kept &= ~dropped
    per_query = np.count_nonzero(kept, axis=1)
    counts["short_queries"] += int(np.count_nonzero(per_query < pool))
    counts["negatives"] += int(per_query.sum())
    rows = np.full((len(ids), pool), -1, dtype=np.int64)
    query, column = np.nonzero(kept)
    rows[query, np.cumsum(kept, axis=1)[query, column] - 1] = ids[query, column]
    return rows


def _filter_ceilings(
    positive_scores: np.ndarray,
    absolute_margin: float | None,
    relative_margin: float | None,
    max_score: float | None,
) -> dict[str, np.ndarray]:
    """Each active filter's highest allowed candidate score per query: count name -> (n,)."""
    ceilings = {}
    if absolute_margin is not None:
        ceilings["dropped_absolute_margin"] = positive_scores - absolute_margin
    if relative_margin is not None:
        ceilings["dropped_relative_margin"] = positive_scores * (1.0 - relative_margin)
    if max_score is not None:
        ceilings["dropped_max_score"] = np.full_like(positive_scores, max_score)
    return ceilings


def _check_arguments(
    queries: np.ndarray,
    positive_ids: np.ndarray,
    bank: np.ndarray,
    skip: int,
    pool: int,
    relative_margin: float | None,
    chunk_size: int,
) -> None:
    """Raise ValueError naming the first argument mine_hard_negatives cannot use."""
    if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries must be (N, {bank.shape[1]}), got {queries.shape}")
    if positive_ids.shape != (len(queries),) or not np.issubdtype(positive_ids.dtype, np.integer):
        raise ValueError(
            f"positive_ids must be ({len(queries)},) integers, got {positive_ids.shape} "
            f"{positive_ids.dtype}"
        )
    if positive_ids.size and (positive_ids.min() < 0 or positive_ids.max() >= len(bank)):
        raise ValueError(f"positive_ids must lie in [0, {len(bank)})")
    if skip < 0 or pool < 1 or chunk_size < 1:
        raise ValueError(
            f"need skip >= 0, pool >= 1, chunk_size >= 1; got {skip}, {pool}, {chunk_size}"
        )
    if relative_margin is not None and not 0.0 <= relative_margin <= 1.0:
        raise ValueError(f"relative_margin must lie in [0, 1], got {relative_margin}")


def mine_table(
    miner: Miner,
    queries: np.ndarray,
    dataset: Dataset,
    rows: np.ndarray,
    config: TrainConfig,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[HardNegativeTable, MiningReport]:
    """Hard negatives of dataset `rows` (n,) from their query vectors (n, D), with the run's
    window and filters; the table has a row per sample (rows not mined stay -1).
    chunk_size: queries per miner call."""
    mined, report = mine_hard_negatives(
        miner,
        queries,
        dataset.positives[rows],
        dataset.bank,
        skip=config.mine_skip,
        pool=config.mine_pool,
        absolute_margin=config.absolute_margin,
        relative_margin=config.relative_margin,
        max_score=config.max_score,
        chunk_size=chunk_size,
        seen=dataset.seen_ids(rows) if config.exclude_context else None,
    )
    table = HardNegativeTable.empty(dataset.num_samples, config.mine_pool)
    table.ids[rows] = mined.ids
    return table, report

"""`twotower search`: the top k bank rows for each query row, through the training miners.

Queries are encoded and searched chunk by chunk; ids and scores stream into
memory maps and then into one .npz (`ids` (N, k) int64, `scores` (N, k)
float32, best first, -1 / -inf where fewer than k remain; `rows` (N,) the
dataset rows), written under a temporary name and renamed into place.

With exclude_context, a query's own context items (its context_ids) are never
returned, except its positive: the miner is asked for k + T and those are
dropped, so each row still holds k ids unless more than T were dropped.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from twotower import progress
from twotower.atomic import replacing, temporary_beside
from twotower.backends import Backend
from twotower.data import Dataset
from twotower.errors import UsageError
from twotower.miners import Miner
from twotower.process.phase import Phase
from twotower.serve.encode import chunk_rows, chunks
from twotower.training.evaluation.metrics import unseen_first

RESULT_KEYS = ("ids", "scores", "rows")


def drop_context(
    scores: np.ndarray, ids: np.ndarray, seen: np.ndarray, positives: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's context items from its ranked results and keep the first k.

    scores, ids (B, k') best first; seen (B, T) the rows' context ids, -1 padded
    (`Dataset.seen_ids`); positives (B,): a context item equal to the positive stays.
    Returns (scores (B, k), ids (B, k)), order kept, padded with -inf / -1.
    """
    kept, dropped = unseen_first(ids, seen, positives, k)
    kept_ids = np.take_along_axis(ids, kept, axis=1)
    kept_scores = np.take_along_axis(scores, kept, axis=1)
    kept_ids[dropped] = -1
    kept_scores[dropped] = -np.inf
    if kept_ids.shape[1] < k:
        pad = k - kept_ids.shape[1]
        kept_ids = np.pad(kept_ids, ((0, 0), (0, pad)), constant_values=-1)
        kept_scores = np.pad(kept_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return kept_scores, kept_ids


def search_to_file(
    encoder: Backend,
    miner: Miner,
    dataset: Dataset,
    rows: np.ndarray,
    k: int,
    out: str | os.PathLike[str],
    exclude_context: bool = False,
    chunk: int | None = None,
) -> Path:
    """Encode `rows`, search `miner` (built over the bank) for the top k of each, and write
    `out` (.npz: ids, scores, rows); returns `out`."""
    out = Path(out)
    if k < 1:
        raise UsageError(f"--k must be >= 1, got {k}")
    if len(rows) == 0:
        raise UsageError("no rows to search for (--rows selects none)")
    if exclude_context:
        dataset.seen_ids(rows[:1])  # UsageError up front for a dataset without context ids
    asked = k + (dataset.seq_len if exclude_context else 0)
    tmp_ids, tmp_scores = (
        temporary_beside(out.with_name(out.name + suffix)) for suffix in (".ids", ".scores")
    )
    what = f"top {k} of {len(dataset.bank):,} bank rows for {len(rows):,} rows with {miner.name}"
    try:
        with progress.task(Phase.SEARCH, what, len(rows), "rows", announce=True) as task:
            ids = np.lib.format.open_memmap(
                tmp_ids, mode="w+", dtype=np.int64, shape=(len(rows), k)
            )
            scores = np.lib.format.open_memmap(
                tmp_scores, mode="w+", dtype=np.float32, shape=(len(rows), k)
            )
            for start, part in chunks(rows, chunk or chunk_rows(dataset)):
                contexts, lengths, positives = dataset.gather(part)
                found_scores, found_ids = miner.search(encoder.encode(contexts, lengths), asked)
                if exclude_context:
                    found_scores, found_ids = drop_context(
                        found_scores, found_ids, dataset.seen_ids(part), positives, k
                    )
                ids[start : start + len(part)] = found_ids[:, :k]
                scores[start : start + len(part)] = found_scores[:, :k]
                task.advance(len(part))
            ids.flush()
            scores.flush()
            with (
                replacing(out, durable=True) as tmp,
                zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
            ):
                arrays = (ids, scores, np.asarray(rows, np.int64))
                for key, array in zip(RESULT_KEYS, arrays, strict=True):
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
    finally:
        for path in (tmp_ids, tmp_scores):
            path.unlink(missing_ok=True)
    return out

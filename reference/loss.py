"""Masked InfoNCE in float64, one query at a time, with its gradient.

For query i with positive id p_i the candidates are, in this order:
bank[p_i], bank[p_j] for j != i (in-batch), hard_vecs[i, :], queue_vecs[:].
A candidate other than the first whose id is p_i or -1 is masked out; with
seen-item masking (`batch.context_ids` (B, T), -1 padded, present and not
None) so is one whose id is among query i's context ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def candidates_for(batch: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate vectors (C, D) and ids (C,) of query i, the positive first."""
    others = [j for j in range(len(batch.positive_ids)) if j != i]
    vecs = np.concatenate(
        [
            np.asarray(batch.positive_vecs, dtype=np.float64)[[i] + others],
            np.asarray(batch.hard_vecs, dtype=np.float64)[i].reshape(
                -1, batch.positive_vecs.shape[1]
            ),
            np.asarray(batch.queue_vecs, dtype=np.float64).reshape(
                -1, batch.positive_vecs.shape[1]
            ),
        ]
    )
    ids = np.concatenate(
        [
            np.asarray(batch.positive_ids)[[i] + others],
            np.asarray(batch.hard_ids)[i].reshape(-1),
            np.asarray(batch.queue_ids).reshape(-1),
        ]
    ).astype(np.int64)
    return vecs, ids


def seen_ids(batch: Any, i: int) -> np.ndarray:
    """The ids query i has already seen (its context ids), or none without seen-item masking."""
    context_ids = getattr(batch, "context_ids", None)
    if context_ids is None:
        return np.zeros(0, dtype=np.int64)
    row = np.asarray(context_ids[i], dtype=np.int64)
    return row[row >= 0]


def infonce(q: np.ndarray, batch: Any, temperature: float) -> tuple[float, np.ndarray]:
    """Mean InfoNCE over the batch. q (B, D) -> (loss, dL/dq (B, D))."""
    batch_size = q.shape[0]
    total = 0.0
    dq = np.zeros_like(q, dtype=np.float64)
    for i in range(batch_size):
        vecs, ids = candidates_for(batch, i)
        keep = (ids != ids[0]) & (ids != -1) & ~np.isin(ids, seen_ids(batch, i))
        keep[0] = True  # the positive counts even when it is one of the query's context items
        vecs = vecs[keep]
        scores = vecs @ q[i] / temperature
        top = scores.max()
        log_norm = top + np.log(np.exp(scores - top).sum())
        total += log_norm - scores[0]
        softmax = np.exp(scores - log_norm)
        dq[i] = (softmax @ vecs - vecs[0]) / temperature / batch_size
    return total / batch_size, dq

"""Masked InfoNCE in float64, one query at a time, with its gradient.

For query i with positive id p_i the candidates are, in this order:
bank[p_i], bank[p_j] for j != i (in-batch), hard_vecs[i, :], queue_vecs[:],
sampled_vecs[:]. A candidate other than the first whose id is p_i or -1 is
masked out; with seen-item masking (`batch.context_ids` (B, T), -1 padded,
present and not None) so is one whose id is among query i's context ids.

Score corrections (each optional, read from the batch when present and not None):
- sampled (`batch.sampled_ids` (S,), `sampled_vecs` (S, D), `bank` (M, D)): each sampled
  score gets + log(M / S), so the S rows stand for the M of the bank;
- logQ (`batch.in_batch_logq` (B,), `batch.queue_logq` (Q,)): log(freq_j / N) of each
  in-batch and queue candidate, subtracted from its score (the positive is in-batch
  candidate i, so it is corrected too).

With `batch.full_softmax` true the candidates are every bank row instead (see `bank.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _rows(values: Any, dim: int) -> np.ndarray:
    """values as float64 (n, dim); None or empty -> (0, dim)."""
    if values is None:
        return np.zeros((0, dim))
    return np.asarray(values, dtype=np.float64).reshape(-1, dim)


def _ids(values: Any) -> np.ndarray:
    return np.zeros(0, np.int64) if values is None else np.asarray(values).reshape(-1)


def candidates_for(batch: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate vectors (C, D), ids (C,) and score corrections (C,) of query i, the
    positive first."""
    dim = batch.positive_vecs.shape[1]
    others = [j for j in range(len(batch.positive_ids)) if j != i]
    order = [i] + others
    sampled_ids = _ids(getattr(batch, "sampled_ids", None))
    vecs = np.concatenate(
        [
            np.asarray(batch.positive_vecs, dtype=np.float64)[order],
            _rows(batch.hard_vecs[i], dim),
            _rows(batch.queue_vecs, dim),
            _rows(getattr(batch, "sampled_vecs", None), dim),
        ]
    )
    ids = np.concatenate(
        [
            np.asarray(batch.positive_ids)[order],
            _ids(batch.hard_ids[i]),
            _ids(batch.queue_ids),
            sampled_ids,
        ]
    ).astype(np.int64)
    in_batch_logq = getattr(batch, "in_batch_logq", None)
    queue_logq = getattr(batch, "queue_logq", None)
    sampled = np.zeros(len(sampled_ids))
    if len(sampled_ids):
        sampled += np.log(len(batch.bank) / len(sampled_ids))  # each stands for M / S rows
    corrections = np.concatenate(
        [
            np.zeros(len(order)) if in_batch_logq is None else -np.asarray(in_batch_logq)[order],
            np.zeros(len(_ids(batch.hard_ids[i]))),
            np.zeros(len(_ids(batch.queue_ids)))
            if queue_logq is None
            else -np.asarray(queue_logq, dtype=np.float64),
            sampled,
        ]
    )
    return vecs, ids, corrections


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
        vecs, ids, corrections = candidates_for(batch, i)
        keep = (ids != ids[0]) & (ids != -1) & ~np.isin(ids, seen_ids(batch, i))
        keep[0] = True  # the positive counts even when it is one of the query's context items
        vecs = vecs[keep]
        # a correction is a constant added to the score: d score / d q is unchanged
        scores = vecs @ q[i] / temperature + corrections[keep]
        top = scores.max()
        log_norm = top + np.log(np.exp(scores - top).sum())
        total += log_norm - scores[0]
        softmax = np.exp(scores - log_norm)
        dq[i] = (softmax @ vecs - vecs[0]) / temperature / batch_size
    return total / batch_size, dq

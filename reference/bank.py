"""InfoNCE over the whole frozen bank in float64: every row a candidate (`--bank-negatives full`).

For query i: s_ij = q_i . bank_j / tau for j = 0..M-1, the target row p_i, query i's
context ids other than p_i masked to -inf (with seen-item masking).

    loss   = mean_i (logsumexp_j s_ij - s_i,p_i)
    dL/dq_i = (sum_j softmax_ij bank_j - bank_p_i) / (tau * B)

The bank is read in chunks of `chunk_rows` rows with a running logsumexp (max m,
sum l of exp(s - m)) and a running softmax-weighted sum of rows, so no more than
B x chunk_rows scores exist at once, whatever M is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.loss import seen_ids

CHUNK_ROWS = 4096


def full_softmax(
    q: np.ndarray, batch: Any, temperature: float, chunk_rows: int = CHUNK_ROWS
) -> tuple[float, np.ndarray]:
    """Mean InfoNCE over every row of `batch.bank` (M, D). q (B, D) -> (loss, dL/dq (B, D))."""
    bank = batch.bank
    batch_size = q.shape[0]
    positive_ids = np.asarray(batch.positive_ids, dtype=np.int64)
    positives = np.asarray(bank[positive_ids], dtype=np.float64)  # (B, D)
    target = np.sum(q * positives, axis=1) / temperature  # s_i,p_i (B,)
    top = target.copy()  # running max m, started at a score that is always a candidate
    total = np.zeros(batch_size)  # running sum l of exp(s - m)
    weighted = np.zeros_like(q, dtype=np.float64)  # running sum of exp(s - m) bank_j
    for start in range(0, len(bank), chunk_rows):
        rows = np.asarray(bank[start : start + chunk_rows], dtype=np.float64)  # (n, D)
        scores = q @ rows.T / temperature  # (B, n)
        for i in range(batch_size):  # masked: query i's context ids in this chunk, p_i excepted
            seen = seen_ids(batch, i)
            seen = seen[(seen >= start) & (seen < start + len(rows)) & (seen != positive_ids[i])]
            scores[i, seen - start] = -np.inf
        new_top = np.maximum(top, scores.max(axis=1))
        rescale = np.exp(top - new_top)
        weights = np.exp(scores - new_top[:, None])  # (B, n)
        total = total * rescale + weights.sum(axis=1)
        weighted = weighted * rescale[:, None] + weights @ rows
        top = new_top
    log_norm = top + np.log(total)  # logsumexp_j s_ij
    loss = float(np.mean(log_norm - target))
    dq = (weighted / total[:, None] - positives) / (temperature * batch_size)
    return loss, dq

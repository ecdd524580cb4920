"""InfoNCE over every row of the frozen bank (`--bank-negatives full`) in float32 NumPy.

The math is `reference/bank.py`'s: a running logsumexp over bank chunks, so at most
b x chunk scores exist at once, and dL/dq_i = (sum_j softmax_ij bank_j - bank_p_i) / (tau B)
comes out of the same pass (a running softmax-weighted sum of rows). The bank is read
chunk by chunk where it lies (a memory map is never copied whole).
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 32 << 20  # bank bytes read per chunk: ~11k rows at D=768


def chunk_rows(dim: int) -> int:
    """Bank rows per chunk for vectors of `dim` float32s."""
    return max(1, CHUNK_BYTES // (4 * dim))


def full_softmax(
    q: np.ndarray,
    bank: np.ndarray,
    positive_ids: np.ndarray,
    seen: tuple[np.ndarray, np.ndarray],
    temperature: float,
    divisor: int,
) -> tuple[float, np.ndarray]:
    """q (b, D) float32 unit queries, bank (M, D) float32, positive_ids (b,), seen (query
    index (n,), bank id (n,)) masked to -inf (`twotower.batch.full_bank_seen`), divisor the global
    batch size B -> (sum_i loss_i / B, dL/dq (b, D) float32)."""
    tau = np.float32(temperature)
    positives = np.asarray(bank[positive_ids], dtype=np.float32)  # (b, D)
    target = np.einsum("bd,bd->b", q, positives) / tau  # s_i,p_i (b,)
    top = target.copy()  # running max, started at a score that always counts
    total = np.zeros(len(q), dtype=np.float32)  # running sum of exp(s - top)
    weighted = np.zeros_like(q)  # running sum of exp(s - top) bank_j (b, D)
    queries, ids = seen
    step = chunk_rows(bank.shape[1])
    for start in range(0, len(bank), step):
        rows = np.asarray(bank[start : start + step], dtype=np.float32)  # a view of the map
        scores = q @ rows.T  # (b, n)
        scores /= tau
        inside = (ids >= start) & (ids < start + len(rows))
        scores[queries[inside], ids[inside] - start] = -np.inf
        new_top = np.maximum(top, scores.max(axis=1))
        rescale = np.exp(top - new_top)
        scores -= new_top[:, None]
        np.exp(scores, out=scores)
        total = total * rescale + scores.sum(axis=1)
        weighted *= rescale[:, None]
        weighted += scores @ rows
        top = new_top
    loss = float(np.sum(top + np.log(total) - target)) / divisor
    dq = weighted / total[:, None]
    dq -= positives
    dq /= tau * np.float32(divisor)
    return loss, dq

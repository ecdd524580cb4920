"""The float64 brute-force oracle and one comparison of neighbour lists up to ties, for every miner;
`recall` of a miner against the oracle, and `independent_recall`: a tower's retrieval metrics
by a float64 search written here, not twotower's.

Two correct miners may order tied rows differently, and when a group of tied
scores straddles the cut-off k they may keep different members of it. So lists
agree when their scores agree within atol position by position, their padding
(-1) is in the same places, no id repeats, and each group of tied reference
scores holds the same ids, except the group at the cut-off of a full row
(faiss' contrib/evaluation.py check_ref_knn_with_draws does the same).
"""

from __future__ import annotations

import numpy as np


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 top-k by inner product: (scores (N, k) float64, ids (N, k) int64), best first.

    Equal scores in id order; rows past M pad with id -1, score -inf.
    """
    all_scores = queries.astype(np.float64) @ bank.astype(np.float64).T  # (N, M)
    found = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    scores = np.full((len(queries), k), -np.inf)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores[:, : found.shape[1]] = np.take_along_axis(all_scores, found, axis=1)
    ids[:, : found.shape[1]] = found
    return scores, ids


def neighbour_disagreement(
    scores: np.ndarray,
    ids: np.ndarray,
    ref_scores: np.ndarray,
    ref_ids: np.ndarray,
    atol: float,
) -> str | None:
    """None if (scores, ids) (N, k) equal the reference lists up to ties, else where they differ."""
    shapes = {a.shape for a in (scores, ids, ref_scores, ref_ids)}
    if len(shapes) != 1:
        return f"shapes differ: scores {scores.shape}, ids {ids.shape}, reference {ref_ids.shape}"
    for row in range(len(ref_ids)):
        problem = _row_disagreement(scores[row], ids[row], ref_scores[row], ref_ids[row], atol)
        if problem is not None:
            return f"row {row}: {problem}"
    return None


def _row_disagreement(
    scores: np.ndarray, ids: np.ndarray, ref_scores: np.ndarray, ref_ids: np.ndarray, atol: float
) -> str | None:
    valid = ref_ids != -1
    if not np.array_equal(ids != -1, valid):
        return (
            f"padding (-1) at ranks {np.flatnonzero(ids == -1)}, expected {np.flatnonzero(~valid)}"
        )
    count = int(valid.sum())
    if not np.all(scores[count:] == -np.inf):
        return f"padding scores {scores[count:]}, expected -inf"
    if len(np.unique(ids[:count])) != count:
        return f"repeated ids in {ids[:count]}"
    error = np.abs(scores[:count].astype(np.float64) - ref_scores[:count])
    if count and error.max() > atol:
        rank = int(error.argmax())
        return f"rank {rank}: score {scores[rank]!r} vs expected {ref_scores[rank]!r} (atol {atol})"
    # tied groups: runs of reference scores that fall by no more than atol from one to the next
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ref_scores[:count]) < -atol) + 1))
    stops = np.append(starts[1:], count)
    cut_off = count == len(ref_ids)  # a full row: its last group may go on past k
    for start, stop in zip(starts, stops, strict=True):
        if cut_off and stop == count:
            break
        found, expected = set(ids[start:stop].tolist()), set(ref_ids[start:stop].tolist())
        if found != expected:
            return f"ranks {start}..{stop - 1}: ids {sorted(found)}, expected {sorted(expected)}"
    return None


def assert_same_neighbours(
    scores: np.ndarray,
    ids: np.ndarray,
    ref_scores: np.ndarray,
    ref_ids: np.ndarray,
    atol: float,
) -> None:
    """Assert (scores, ids) (N, k) equal the reference lists up to ties; the message says where."""
    problem = neighbour_disagreement(scores, ids, ref_scores, ref_ids, atol)
    assert problem is None, problem


def recall(ids: np.ndarray, ref_ids: np.ndarray) -> float:
    """Mean fraction of each row's reference neighbours that `ids` found."""
    found = [len(np.intersect1d(row, ref)) for row, ref in zip(ids, ref_ids, strict=True)]
    return float(np.mean(found)) / ref_ids.shape[1]


def independent_recall(
    q: np.ndarray,
    bank: np.ndarray,
    positives: np.ndarray,
    seen: np.ndarray | None = None,
) -> dict[str, float]:
    """recall@1/10/100 and MRR@100 by a float64 brute-force search written here; with seen
    (N, T) context ids (-1 padded), those bank rows score -inf unless they are the positive."""
    scores = q @ np.asarray(bank, dtype=np.float64).T
    if seen is not None:
        for i, ids in enumerate(seen):
            masked = [j for j in ids if j >= 0 and j != positives[i]]
            scores[i, masked] = -np.inf
    positive_scores = scores[np.arange(len(q)), positives]
    rank = (scores > positive_scores[:, None]).sum(axis=1)  # 0 = first
    metrics = {f"recall@{c}": float(np.mean(rank < c)) for c in (1, 10, 100)}
    metrics["mrr@100"] = float(np.mean(np.where(rank < 100, 1.0 / (rank + 1), 0.0)))
    return metrics

"""Retrieval quality: recall@1/10/100 and MRR@100 of a query tower, and of the parameter-free
baselines (the last context item, the mean of the context) on the same rows, with the lift.

Rows are ranked against the whole bank in blocks (encode, search, score, next block), so any
number of rows fits in memory. With seen-item masking the search asks for T more ids and
drops each query's own context items, the positive excepted, before cutting to 100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from twotower import progress
from twotower.backends import Backend
from twotower.batch import seen_by_query
from twotower.config import CUTOFFS, METRICS
from twotower.data import Dataset
from twotower.miners import Miner
from twotower.process.phase import Phase

__all__ = [
    "BASELINES",
    "CUTOFFS",
    "Comparison",
    "baseline_queries",
    "encode_rows",
    "evaluate",
    "evaluate_baselines",
    "rank_rows",
    "retrieval_metrics",
    "without_seen",
]

Gather = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
Encode = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (contexts, lengths) -> (B, D)
BLOCK = 1024  # rows encoded and searched at a time
BASELINES = ("last item", "context mean")


def encode_rows(
    backend: Backend, gather: Gather, rows: np.ndarray, chunk: int = 256, label: str = "encode"
) -> np.ndarray:
    """Unit query vectors (len(rows), D) float32 for dataset rows, `chunk` at a time.

    gather(rows) -> (contexts (B, T, D), lengths (B,), positive ids (B,)), as Dataset.gather.
    The work is the "encode" progress task (`twotower.progress`).
    """
    out: np.ndarray | None = None
    purpose = label.removesuffix("encode").removesuffix(": ")  # the task is named "encode"
    what = f"{len(rows):,} queries on {backend.name}" + (f" ({purpose})" if purpose else "")
    with progress.task(Phase.ENCODE, what, len(rows), "queries") as task:
        for start in range(0, len(rows), chunk):
            contexts, lengths, _ = gather(rows[start : start + chunk])
            q = backend.encode(contexts, lengths)
            if out is None:
                out = np.empty((len(rows), q.shape[1]), dtype=np.float32)
            out[start : start + len(q)] = q
            task.advance(len(q))
    assert out is not None, "encode_rows needs at least one row"
    return out


def retrieval_metrics(ids: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """ids (N, k) ranked bank ids, positives (N,) -> recall@1/10/100 and MRR@k.

    recall@c is the share of queries whose positive is among the first c ids.
    """
    hits = ids == positives[:, None]
    found = hits.any(axis=1)
    rank = np.where(found, hits.argmax(axis=1) + 1, 0)
    metrics = {f"recall@{c}": float(np.mean(found & (rank <= c))) for c in CUTOFFS}
    metrics[f"mrr@{ids.shape[1]}"] = float(np.mean(np.where(found, 1.0 / np.maximum(rank, 1), 0.0)))
    return metrics


def unseen_first(
    ids: np.ndarray, seen: np.ndarray, positives: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seen-item masking of a ranking, as column indices: ids (N, C) best first, seen (N, T)
    each query's context ids (-1 padded), positives (N,) -> (columns (N, min(k, C)) of the
    first ids not among the query's context ids, the positive excepted, in rank order;
    whether each of those columns is a seen one after all (only when fewer than k remain))."""
    drop = seen_by_query(seen, ids) & (ids != positives[:, None])
    kept_first = np.argsort(drop, axis=1, kind="stable")[:, :k]  # stable: ranks keep their order
    return kept_first, np.take_along_axis(drop, kept_first, axis=1)


def without_seen(ids: np.ndarray, seen: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """Seen-item masking of a ranking: ids (N, k + T) best first, seen (N, T) each query's
    context ids (-1 padded), positives (N,) -> the first k ids (N, k) that are not among
    the query's context ids, the positive excepted (it is never dropped)."""
    kept_first, _ = unseen_first(ids, seen, positives, k)
    return np.take_along_axis(ids, kept_first, axis=1)


def rank_rows(
    encode: Encode,
    dataset: Dataset,
    rows: np.ndarray,
    miner: Miner,
    exclude_context: bool = False,
    label: str = "eval",
) -> dict[str, float]:
    """Metrics of the queries encode(contexts, lengths) gives for `dataset`'s rows (n,),
    ranked by `miner` over the dataset's bank, BLOCK rows at a time (means over all rows)."""
    k = max(CUTOFFS)
    totals = dict.fromkeys(METRICS, 0.0)
    what = f"{label}: {len(rows):,} queries with {miner.name}"
    with progress.task(Phase.EVALUATE, what, len(rows), "queries") as task:
        for start in range(0, len(rows), BLOCK):
            block = rows[start : start + BLOCK]
            _rank_block(encode, dataset, block, miner, exclude_context, k, totals)
            task.advance(len(block))
    return {name: total / max(len(rows), 1) for name, total in totals.items()}


def _rank_block(
    encode: Encode,
    dataset: Dataset,
    block: np.ndarray,
    miner: Miner,
    exclude_context: bool,
    k: int,
    totals: dict[str, float],
) -> None:
    """Rank one block of rows and add its metrics, weighted by its size, to `totals`."""
    contexts, lengths, positives = dataset.gather(block)
    queries = encode(contexts, lengths)
    if exclude_context:
        seen = dataset.seen_ids(block)
        _, ids = miner.search(queries, k + seen.shape[1])
        ids = without_seen(ids, seen, positives, k)
    else:
        _, ids = miner.search(queries, k)
    for name, value in retrieval_metrics(ids, positives).items():
        totals[name] += value * len(block)


def evaluate(
    backend: Backend,
    dataset: Dataset,
    rows: np.ndarray,
    miner: Miner,
    exclude_context: bool = False,
) -> dict[str, float]:
    """The backend's query tower on `dataset`'s rows (n,) against its whole bank:
    recall@1/10/100 and MRR@100."""
    return rank_rows(backend.encode, dataset, rows, miner, exclude_context)


def baseline_queries(name: str, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Parameter-free queries (B, D) float32 for contexts (B, T, D), zero past lengths (B,):
    'last item' = normalize(x[length - 1]), 'context mean' = normalize(mean of x[:length])."""
    if name == "last item":
        vectors = contexts[np.arange(len(lengths)), np.asarray(lengths) - 1]
    elif name == "context mean":
        vectors = contexts.sum(axis=1) / np.asarray(lengths, dtype=np.float32)[:, None]
    else:
        raise ValueError(f"no baseline {name!r}; the baselines are {', '.join(BASELINES)}")
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.asarray(vectors / norms, dtype=np.float32)


def evaluate_baselines(
    dataset: Dataset, rows: np.ndarray, miner: Miner, exclude_context: bool = False
) -> dict[str, dict[str, float]]:
    """{baseline name: metrics} of every parameter-free baseline on the same rows and rules."""
    return {
        name: rank_rows(
            partial(baseline_queries, name), dataset, rows, miner, exclude_context, f"{name}"
        )
        for name in BASELINES
    }


@dataclass
class Comparison:
    """A tower's metrics beside the baselines' on the same rows; `metric` is the one the
    lift is computed on (the run's --select-metric)."""

    model: dict[str, float]
    baselines: dict[str, dict[str, float]]
    metric: str

    @property
    def best_baseline(self) -> str:
        """The baseline scoring highest on `metric`."""
        return max(self.baselines, key=lambda name: self.baselines[name][self.metric])

    @property
    def lift(self) -> float:
        """model / best baseline - 1 on `metric` (+0.25: 25% better; inf over a zero)."""
        base = self.baselines[self.best_baseline][self.metric]
        model = self.model[self.metric]
        return model / base - 1 if base > 0 else (0.0 if model == 0 else float("inf"))

    def lift_text(self) -> str:
        """The lift in words: '+15.4%', or '52x' once the tower is 10 times the baseline."""
        if self.lift >= 9:
            return f"{self.lift + 1:.0f}x" if self.lift != float("inf") else "inf"
        return f"{100 * self.lift:+.1f}%"

    def verdict(self) -> str:
        """One line: the lift, and a warning when a baseline beats the tower."""
        best = self.best_baseline
        line = (
            f"{self.metric} {self.model[self.metric]:.4f} vs {best} (the best baseline) "
            f"{self.baselines[best][self.metric]:.4f}: lift {self.lift_text()}"
        )
        if self.lift < 0:
            line += f"; the parameter-free {best} baseline beats the tower"
        return line

    def table(self, label: str = "tower") -> list[str]:
        """Rows of metric | tower | each baseline, then the verdict."""
        names = list(self.baselines)
        widths = [max(len(label), 8)] + [max(len(n), 8) for n in names]
        head = f"{'metric':12s} " + " ".join(
            f"{n:>{w}s}" for n, w in zip([label, *names], widths, strict=True)
        )
        lines = [head]
        for metric in self.model:
            values = [self.model[metric]] + [self.baselines[n][metric] for n in names]
            lines.append(
                f"{metric:12s} "
                + " ".join(f"{v:>{w}.4f}" for v, w in zip(values, widths, strict=True))
            )
        return [*lines, self.verdict()]

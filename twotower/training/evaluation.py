"""Encoding many queries in chunks, and retrieval quality: recall@1/10/100 and MRR@100."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from twotower import miners, progress
from twotower.backends import Backend, make_backend
from twotower.batch import seen_by_query
from twotower.config import TrainConfig
from twotower.data import holdout_split, load_dataset
from twotower.miners import Miner
from twotower.paths import user_cache_dir
from twotower.seeds import EVAL_SPLIT
from twotower.training.checkpoint import load_checkpoint

CUTOFFS = (1, 10, 100)
Gather = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def encode_rows(
    backend: Backend, gather: Gather, rows: np.ndarray, chunk: int = 256, label: str = "encode"
) -> np.ndarray:
    """Unit query vectors (len(rows), D) float32 for dataset rows, `chunk` at a time.

    gather(rows) -> (contexts (B, T, D), lengths (B,), positive ids (B,)), as Dataset.gather.
    The work is the "encode" progress task (`twotower.progress`).
    """
    out: np.ndarray | None = None
    what = f"{label}: {len(rows):,} queries on {backend.name}"
    with progress.task("encode", what, len(rows), "queries") as task:
        for start in tqdm(
            range(0, len(rows), chunk), desc=label, unit="chunk", leave=False, disable=None
        ):
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


def evaluate(
    backend: Backend,
    gather: Gather,
    rows: np.ndarray,
    positives: np.ndarray,
    miner: Miner,
    seen: np.ndarray | None = None,
) -> dict[str, float]:
    """Encode the held-out rows and search the whole bank: recall@1/10/100, MRR@100.

    seen (N, T): the rows' context ids, -1 padded, for seen-item masking (None: off); the
    search then asks for T more ids and drops the seen ones before cutting to 100.
    The work is the "evaluate" progress task (`twotower.progress`).
    """
    with progress.task("evaluate", f"{len(rows):,} held-out queries with {miner.name}"):
        queries = encode_rows(backend, gather, rows, label="eval")
        k = max(CUTOFFS)
        if seen is None:
            _, ids = miner.search(queries, k)
        else:
            _, ids = miner.search(queries, k + seen.shape[1])
            ids = without_seen(ids, seen, positives, k)
    return retrieval_metrics(ids, positives)


def held_out_split(
    num_samples: int, eval_fraction: float, max_eval: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a run: the same split for training and `twotower eval`."""
    return holdout_split(num_samples, eval_fraction, max_eval, seed * 1000 + EVAL_SPLIT)


def evaluate_run(
    run: str | None = None,
    data: str | None = None,
    tower: str | None = None,
    proj: bool = True,
    backend: str = "auto",
    miner: str = "exact",
    seed: int | None = None,
    max_eval: int | None = None,
    exclude_context: bool | None = None,
) -> dict[str, float]:
    """Retrieval metrics of a run's newest checkpoint (or a checkpoint directory) on its
    held-out split; without `run`, of a freshly initialised tower (meanpool with
    proj=False is the parameter-free baseline). exclude_context: seen-item masking of the
    ranking (None: as the run's config says)."""
    settings: dict[str, Any] = {}
    state = None
    if run is not None:
        _, state = load_checkpoint(run)
        run_dir = Path(run) if (Path(run) / "config.json").exists() else Path(run).parent.parent
        settings = TrainConfig.read_file(run_dir / "config.json")
    config = TrainConfig.from_dict(
        {
            **settings,
            **({"data": data} if data else {}),
            **({"tower": tower} if tower else {}),
            **({"seed": seed} if seed is not None else {}),
            **({"max_eval": max_eval} if max_eval is not None else {}),
            **({"exclude_context": exclude_context} if exclude_context is not None else {}),
            "proj": proj and settings.get("proj", True),
            "backend": backend,
            "resume": False,
        }
    )
    dataset = load_dataset(config.data)  # type: ignore[arg-type]
    cache = user_cache_dir() / "index"
    engine = make_backend(config, dataset.dim)
    if state is not None:
        engine.load_state(state)
    split = held_out_split(dataset.num_samples, config.eval_fraction, config.max_eval, config.seed)
    rows = split[1]
    search = miners.get_for(config, miner, cache, fault_phase=None)
    search.build(dataset.bank, fingerprint=dataset.fingerprint)
    seen = dataset.seen_ids(rows) if config.exclude_context else None
    return evaluate(engine, dataset.gather, rows, dataset.positives[rows], search, seen)

"""What one training step sees (`Batch`), the candidates of its loss (`CandidateBlock`,
`candidate_blocks`: the one description every engine builds its scores from) and what it
reports (`StepStats`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One step's inputs, all NumPy. B queries, T steps, D dims, K hard negatives, Q queue slots.

    Ids of -1 in `hard_ids` or `queue_ids` mark empty slots (masked out of the loss).
    `context_ids` (the bank ids of each query's context items, -1 padded) turns seen-item
    masking on: a candidate among query i's context ids is masked unless it is p_i itself.
    None (the default) leaves it off.

    Negatives from the whole bank (DESIGN.md, "Negatives from the whole bank"): `bank` is the
    frozen (M, D) bank, memory-mapped and never copied. With `full_softmax` every bank row is a
    candidate and in-batch, hard, queue and sampled candidates are not used. Else S
    `sampled_ids` (shared by the batch, after the queue) each score + log(M / S). logQ:
    `in_batch_logq` (B,) and `queue_logq` (Q,), log(freq_j / N) of each candidate, are
    subtracted from its score. Each None (the default) leaves its option off.
    """

    contexts: np.ndarray  # (B, T, D) float32
    lengths: np.ndarray  # (B,) int64, 1 <= length <= T
    positive_ids: np.ndarray  # (B,) int64 bank rows
    positive_vecs: np.ndarray  # (B, D) float32, bank[positive_ids]
    hard_ids: np.ndarray  # (B, K) int64
    hard_vecs: np.ndarray  # (B, K, D) float32
    queue_ids: np.ndarray  # (Q,) int64
    queue_vecs: np.ndarray  # (Q, D) float32
    context_ids: np.ndarray | None = None  # (B, T) int64, -1 padded; None: no seen-item masking
    bank: np.ndarray | None = None  # (M, D) float32 memory map: full softmax, sampled's M
    full_softmax: bool = False  # every bank row a candidate (needs bank)
    sampled_ids: np.ndarray | None = None  # (S,) int64 distinct bank rows shared by the batch
    sampled_vecs: np.ndarray | None = None  # (S, D) float32, bank[sampled_ids]
    in_batch_logq: np.ndarray | None = None  # (B,) float32 log(freq / N) of each positive id
    queue_logq: np.ndarray | None = None  # (Q,) float32 log(freq / N) of each queue id

    @classmethod
    def in_batch_only(
        cls,
        contexts: np.ndarray,
        lengths: np.ndarray,
        positive_ids: np.ndarray,
        positive_vecs: np.ndarray,
    ) -> Batch:
        """A batch with no hard negatives (K = 0) and no queue (Q = 0)."""
        batch_size, dim = positive_vecs.shape
        return cls(
            contexts=contexts,
            lengths=lengths,
            positive_ids=positive_ids,
            positive_vecs=positive_vecs,
            hard_ids=np.zeros((batch_size, 0), dtype=np.int64),
            hard_vecs=np.zeros((batch_size, 0, dim), dtype=np.float32),
            queue_ids=np.zeros(0, dtype=np.int64),
            queue_vecs=np.zeros((0, dim), dtype=np.float32),
        )


@dataclass(frozen=True)
class CandidateBlock:
    """One kind of candidate of the loss, for the b queries of a batch (docs/DESIGN.md, "Loss").

    An engine scores each block (q . vector / tau), adds its correction, sets its masked
    entries to -inf and concatenates the blocks in order: the columns of the softmax.

    name: "in_batch", "hard", "queue" or "sampled".
    ids: (n,) candidates every query shares, or (b, n) one row per query (hard negatives).
    vectors: (n, D) shared, or (b, n, D) per query: the candidates' bank vectors.
    masked: (b, n) bool, True where the candidate is left out of the loss (-inf).
    correction: (n,) added to each candidate's logit (score / tau): + log(M / S) for sampled
        rows, - log(freq / N) for logQ; None for none.
    """

    name: str
    ids: np.ndarray
    vectors: np.ndarray
    masked: np.ndarray
    correction: np.ndarray | None = None

    @property
    def per_query(self) -> bool:
        """Whether each query has its own candidates (vectors (b, n, D))."""
        return self.vectors.ndim == 3

    @property
    def size(self) -> int:
        """n, the block's candidates per query (its columns of the softmax)."""
        return self.masked.shape[1]


def candidate_blocks(batch: Batch, first_row: int = 0) -> list[CandidateBlock]:
    """The candidates of the b = len(batch.contexts) queries, in docs/DESIGN.md's order:
    in-batch (B,) (query i's positive is column first_row + i, the target), hard (b, K),
    queue (Q,), then the sampled bank rows (S,) when the batch has them.

    The queries are rows [first_row, first_row + b) of the B positives: all of them in one
    process, one rank's shard of the global batch under torchrun. A candidate is masked when
    it is not the query's own positive and its id is the positive's (a duplicate), -1 (an
    empty slot) or, with `context_ids`, one of the query's context ids (an item it has seen).
    Not used with `full_softmax` (see `full_bank_seen`).
    """
    positives = own_positive_ids(batch, first_row)[:, None]  # (b, 1)
    in_batch = excluded(batch, batch.positive_ids[None, :], positives)
    queries = np.arange(len(positives))
    in_batch[queries, first_row + queries] = False  # each query's own positive
    blocks = [
        CandidateBlock(
            "in_batch",
            batch.positive_ids,
            batch.positive_vecs,
            in_batch,
            _negated(batch.in_batch_logq),
        ),
        CandidateBlock(
            "hard", batch.hard_ids, batch.hard_vecs, excluded(batch, batch.hard_ids, positives)
        ),
        CandidateBlock(
            "queue",
            batch.queue_ids,
            batch.queue_vecs,
            excluded(batch, batch.queue_ids[None, :], positives),
            _negated(batch.queue_logq),
        ),
    ]
    if batch.sampled_ids is not None:
        assert batch.sampled_vecs is not None, "sampled ids come with their vectors"
        ids = batch.sampled_ids
        blocks.append(
            CandidateBlock(
                "sampled",
                ids,
                batch.sampled_vecs,
                excluded(batch, ids[None, :], positives),
                sampled_correction(batch),
            )
        )
    return blocks


def own_positive_ids(batch: Batch, first_row: int = 0) -> np.ndarray:
    """(b,) the positive ids of the batch's queries (see `candidate_blocks`)."""
    return batch.positive_ids[first_row : first_row + len(batch.contexts)]


def excluded(batch: Batch, ids: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """(b, n) bool: candidates ids (b, n), or (1, n) shared, whose id is the query's positive
    (positives (b, 1)), -1 or, with `context_ids`, one of the query's context ids. The
    caller unmasks the query's own positive where it is among the candidates."""
    masked = (ids == positives) | (ids == -1)
    if batch.context_ids is not None:
        masked |= seen_by_query(batch.context_ids, ids)
    return masked


def _negated(log_freq: np.ndarray | None) -> np.ndarray | None:
    """The logQ correction - log(freq / N) (n,), or None without logQ."""
    return None if log_freq is None else -log_freq


def sampled_correction(batch: Batch) -> np.ndarray:
    """(S,) float64 log(M / S) for each sampled row (each stands for M / S bank rows)."""
    count = 0 if batch.sampled_ids is None else len(batch.sampled_ids)
    if count == 0:
        return np.zeros(0)
    assert batch.bank is not None, "sampled negatives need the bank (its M)"
    return np.full(count, np.log(len(batch.bank) / count))


def full_bank_seen(batch: Batch, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The bank entries the full softmax masks: (query index (n,), bank id (n,)) for each
    context id of each query other than its positive (the rule of `candidate_blocks` with
    every bank row a candidate); empty without `context_ids`."""
    if batch.context_ids is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = np.asarray(batch.context_ids, dtype=np.int64)
    positives = own_positive_ids(batch, first_row)[:, None]
    queries, slots = np.nonzero((ids >= 0) & (ids != positives))
    pairs = np.unique(np.stack([queries, ids[queries, slots]]), axis=1)
    return pairs[0], pairs[1]


def seen_by_query(context_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(B, C) bool: whether candidate ids[i, c] is one of context_ids[i] (B, T), -1 padded.

    ids is (B, C), or (1, C) for candidates every query shares. Cost is one
    `np.isin` of the candidates plus a check of each candidate whose id some
    query has seen, never a (B, T, C) comparison: C may be a 50k queue.
    """
    context_ids = np.asarray(context_ids, dtype=np.int64)
    seen = np.zeros((len(context_ids), ids.shape[1]), dtype=bool)
    known = context_ids[context_ids >= 0]
    if known.size == 0 or ids.size == 0:
        return seen
    hits = np.isin(ids, known)
    if ids.shape[0] == 1:  # shared candidates (in-batch, queue): check the hit columns only
        cols = np.flatnonzero(hits[0])
        seen[:, cols] = (context_ids[:, :, None] == ids[0, cols][None, None, :]).any(axis=1)
        return seen
    rows, cols = np.nonzero(hits)
    seen[rows, cols] = (context_ids[rows] == ids[rows, cols][:, None]).any(axis=1)
    return seen


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports.

    loss: the batch's InfoNCE loss; grad_norm: the global L2 norm before
    clipping; applied: False when the loss or a gradient was not finite and
    the parameters were left untouched.
    """

    loss: float
    grad_norm: float
    applied: bool = True

"""What one training step sees (`Batch`) and what it reports (`StepStats`)."""

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

    def candidate_masks(self, first_row: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which candidates the loss ignores: (in-batch (b, B), hard (b, K), queue (b, Q)).

        True where a candidate other than the query's own positive has the
        positive's id (a duplicate), the id -1 (an empty slot) or, with
        `context_ids`, one of the query's context ids (an item it has seen). The
        b = len(contexts) queries are rows [first_row, first_row + b) of the B positives:
        all of them (b = B, first_row 0) in one process, one rank's shard of the global
        batch under torchrun (`twotower.training.ranks.distributed`).
        """
        in_batch, hard = self.batch_masks(first_row)
        positives = self.own_positive_ids(first_row)[:, None]
        queue = (self.queue_ids[None, :] == positives) | (self.queue_ids[None, :] == -1)
        seen = self.seen_in_queue()
        return in_batch, hard, queue if seen is None else queue | seen

    def own_positive_ids(self, first_row: int = 0) -> np.ndarray:
        """(b,) the positive ids of this batch's queries (see `candidate_masks`)."""
        return self.positive_ids[first_row : first_row + len(self.contexts)]

    def batch_masks(self, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The in-batch (b, B) and hard (b, K) parts of `candidate_masks` (an engine that
        holds the queue elsewhere masks that part itself, by the same rule)."""
        queries = np.arange(len(self.contexts))
        positives = self.own_positive_ids(first_row)[:, None]  # (b, 1)
        in_batch = positives == self.positive_ids[None, :]
        hard = (self.hard_ids == positives) | (self.hard_ids == -1)
        if self.context_ids is not None:
            in_batch |= seen_by_query(self.context_ids, self.positive_ids[None, :])
            hard |= seen_by_query(self.context_ids, self.hard_ids)
        in_batch[queries, first_row + queries] = False  # each query's own positive
        return in_batch, hard

    def sampled_mask(self, first_row: int = 0) -> np.ndarray:
        """(b, S) bool: sampled candidates the loss ignores (the query's positive, or with
        `context_ids` one of its context items); (b, 0) without sampled negatives."""
        positives = self.own_positive_ids(first_row)[:, None]
        if self.sampled_ids is None:
            return np.zeros((len(positives), 0), dtype=bool)
        masked = self.sampled_ids[None, :] == positives
        if self.context_ids is not None:
            masked |= seen_by_query(self.context_ids, self.sampled_ids[None, :])
        return masked

    def sampled_offset(self) -> float:
        """log(M / S), added to each sampled score (each sampled row stands for M / S rows)."""
        if self.sampled_ids is None or len(self.sampled_ids) == 0:
            return 0.0
        assert self.bank is not None, "sampled negatives need the bank (its M)"
        return float(np.log(len(self.bank) / len(self.sampled_ids)))

    def seen_full_bank(self, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The bank entries the full softmax masks: (query index (n,), bank id (n,)) for each
        context id of each query other than its positive; empty without `context_ids`."""
        if self.context_ids is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.asarray(self.context_ids, dtype=np.int64)
        positives = self.own_positive_ids(first_row)[:, None]
        queries, slots = np.nonzero((ids >= 0) & (ids != positives))
        pairs = np.unique(np.stack([queries, ids[queries, slots]]), axis=1)
        return pairs[0], pairs[1]

    def seen_in_queue(self) -> np.ndarray | None:
        """(b, Q) bool: queue entries among each query's context ids; None without them."""
        if self.context_ids is None:
            return None
        return seen_by_query(self.context_ids, self.queue_ids[None, :])


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

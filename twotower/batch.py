"""What one training step sees (`Batch`) and what it reports (`StepStats`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One step's inputs, all NumPy. B queries, T steps, D dims, K hard negatives, Q queue slots.

    Ids of -1 in `hard_ids` or `queue_ids` mark empty slots (masked out of the loss).
    """

    contexts: np.ndarray  # (B, T, D) float32
    lengths: np.ndarray  # (B,) int64, 1 <= length <= T
    positive_ids: np.ndarray  # (B,) int64 bank rows
    positive_vecs: np.ndarray  # (B, D) float32, bank[positive_ids]
    hard_ids: np.ndarray  # (B, K) int64
    hard_vecs: np.ndarray  # (B, K, D) float32
    queue_ids: np.ndarray  # (Q,) int64
    queue_vecs: np.ndarray  # (Q, D) float32

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

    def candidate_masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which candidates the loss ignores: (in-batch (B, B), hard (B, K), queue (B, Q)).

        True where a candidate other than the query's own positive has the
        positive's id (a duplicate) or the id -1 (an empty slot).
        """
        positives = self.positive_ids[:, None]
        in_batch = positives == self.positive_ids[None, :]
        np.fill_diagonal(in_batch, False)
        hard = (self.hard_ids == positives) | (self.hard_ids == -1)
        queue = (self.queue_ids[None, :] == positives) | (self.queue_ids[None, :] == -1)
        return in_batch, hard, queue


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

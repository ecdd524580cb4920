"""Small random batches for the numerical tests, with the awkward cases docs/DESIGN.md names."""

from __future__ import annotations

import numpy as np

from twotower import Batch


def make_batch(
    rng: np.random.Generator,
    batch: int = 6,
    steps: int = 5,
    dim: int = 12,
    hard: int = 3,
    queue: int = 7,
    bank: int = 40,
    garbage_padding: bool = True,
    awkward_ids: bool = True,
    context_ids: bool = False,
    sampled: int = 0,
    logq: bool = False,
    full_softmax: bool = False,
) -> Batch:
    """A float32 Batch over a random bank of unit vectors.

    garbage_padding: large values and NaN past each sequence's length (they must
    never matter). awkward_ids: a duplicate positive in the batch, a hard
    negative equal to its positive, and -1 ids in hard and queue slots.
    context_ids: the contexts are bank rows and the batch carries their ids
    (seen-item masking), with a context item that is another query's positive
    (query 0), one of the query's hard negatives (query 1, needs hard >= 2), a queue
    entry (query 2, needs queue >= 2) and the query's own positive (query 3).
    Negatives from the bank (the batch then carries the bank): `sampled` S distinct rows, the
    first one query 0's positive (awkward_ids) and, with context_ids, the second one among
    query 4's context items; `logq`: log(freq / N) of made-up positive counts for the
    in-batch and queue candidates; `full_softmax`: every bank row a candidate.
    """
    bank_vecs = rng.standard_normal((bank, dim))
    bank_vecs /= np.linalg.norm(bank_vecs, axis=1, keepdims=True)
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    lengths[-1] = 1
    contexts = rng.standard_normal((batch, steps, dim))
    if garbage_padding:
        for i, length in enumerate(lengths):
            contexts[i, length:] = 1e4
            if length < steps:
                contexts[i, -1, 0] = np.nan
    positive_ids = rng.choice(bank, size=batch, replace=False)
    hard_ids = rng.integers(0, bank, size=(batch, hard))
    queue_ids = rng.integers(0, bank, size=queue)
    if awkward_ids:
        if batch > 2:
            positive_ids[2] = positive_ids[1]
        if hard:
            hard_ids[0, 0] = positive_ids[0]
            hard_ids[-1, -1] = -1
        if queue:
            queue_ids[0] = -1
            queue_ids[-1] = positive_ids[0]
    sampled_ids = rng.choice(bank, size=sampled, replace=False) if sampled else None
    if sampled_ids is not None and awkward_ids:
        sampled_ids[0] = positive_ids[0]
        sampled_ids[1:] = rng.choice(
            np.setdiff1d(np.arange(bank), sampled_ids[:1]), sampled - 1, replace=False
        )
    seen = None
    if context_ids:
        seen = rng.integers(0, bank, size=(batch, steps))
        seen[0, 0] = positive_ids[1]
        seen[1, 0] = hard_ids[1, 1]
        seen[2, 0] = queue_ids[1]
        seen[3, 0] = positive_ids[3]
        if sampled_ids is not None and batch > 4 and sampled > 1:
            seen[4, 0] = sampled_ids[1]
        valid = np.arange(steps)[None, :] < lengths[:, None]
        contexts = np.where(valid[..., None], bank_vecs[seen], contexts)
        seen = np.where(valid, seen, -1).astype(np.int64)
    hard_vecs = np.where((hard_ids >= 0)[..., None], bank_vecs[hard_ids], 0.0)
    queue_vecs = np.where((queue_ids >= 0)[:, None], bank_vecs[queue_ids], 0.0)
    log_freq = np.log(rng.integers(1, 20, size=bank) / (20.0 * bank)) if logq else None
    bank32 = bank_vecs.astype(np.float32)
    return Batch(
        contexts=contexts.astype(np.float32),
        lengths=lengths.astype(np.int64),
        positive_ids=positive_ids.astype(np.int64),
        positive_vecs=bank_vecs[positive_ids].astype(np.float32),
        hard_ids=hard_ids.astype(np.int64),
        hard_vecs=hard_vecs.reshape(batch, hard, dim).astype(np.float32),
        queue_ids=queue_ids.astype(np.int64),
        queue_vecs=queue_vecs.reshape(queue, dim).astype(np.float32),
        context_ids=seen,
        bank=bank32 if sampled or full_softmax else None,
        full_softmax=full_softmax,
        sampled_ids=None if sampled_ids is None else sampled_ids.astype(np.int64),
        sampled_vecs=None if sampled_ids is None else bank32[sampled_ids],
        in_batch_logq=None if log_freq is None else log_freq[positive_ids].astype(np.float32),
        queue_logq=None
        if log_freq is None
        else log_freq[np.maximum(queue_ids, 0)].astype(np.float32),
    )


def perturbed(batch: Batch) -> Batch:
    """The same batch with the first sequence moved: results must change."""
    contexts = batch.contexts.copy()
    contexts[0, :, :] += 2.0
    return Batch(**{**batch.__dict__, "contexts": contexts})

"""Which rows step s trains on, their data gathered one step ahead, the mined table its hard
negatives come from, and step s's Batch.

Step s belongs to epoch s // batches_per_epoch and takes the next slice of that
epoch's order, permutation(SeedSequence([seed, epoch])) of the training rows,
so the batch of any step follows from the step number alone. The trailing
partial batch of an epoch is dropped: every batch has exactly B rows.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from twotower.batch import Batch
from twotower.data import Dataset
from twotower.errors import UsageError
from twotower.seeds import HARD_NEGATIVES, epoch_order, step_rng
from twotower.training.negatives.bank_negatives import BankNegatives
from twotower.training.negatives.mining import (
    HardNegativeTable,
)
from twotower.training.negatives.queue import MemoryQueue


@dataclass
class StepData:
    """The data part of step s's batch (negatives are added at step time)."""

    step: int
    rows: np.ndarray  # (B,) int64 dataset rows
    contexts: np.ndarray  # (B, T, D) float32
    lengths: np.ndarray  # (B,) int64
    positive_ids: np.ndarray  # (B,) int64
    positive_vecs: np.ndarray  # (B, D) float32
    context_ids: np.ndarray | None = None  # (B, T) int64, -1 padded; None: not masking seen items

    @property
    def digest(self) -> str:
        """A short hash of the rows, logged per step so runs can be compared batch by batch."""
        return hashlib.blake2b(self.rows.tobytes(), digest_size=8).hexdigest()


class StepPlan:
    """Rows of every step for a fixed set of training rows, batch size and seed."""

    def __init__(self, train_rows: np.ndarray, batch_size: int, seed: int):
        self.train_rows = np.asarray(train_rows, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self.train_rows) // batch_size
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"{len(self.train_rows)} training samples are fewer than one batch of "
                f"--batch-size {batch_size}; lower it or add data"
            )
        self._epoch = -1
        self._order = self.train_rows

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def rows_for(self, step: int) -> np.ndarray:
        """(B,) dataset rows of step `step` (steps count from 0)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order = epoch_order(self.seed, epoch, self.train_rows)
            self._epoch = epoch
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]

    def rows_between(self, start: int, stop: int) -> np.ndarray:
        """Sorted unique dataset rows that steps [start, stop) train on, across epoch boundaries.

        Reads each touched epoch's order once without disturbing `rows_for`'s cached one.
        """
        parts = [np.empty(0, dtype=np.int64)]
        step = start
        while step < stop:
            epoch, index = divmod(step, self.batches_per_epoch)
            end = min(stop, (epoch + 1) * self.batches_per_epoch)
            order = epoch_order(self.seed, epoch, self.train_rows)
            last = end - epoch * self.batches_per_epoch
            parts.append(order[index * self.batch_size : last * self.batch_size])
            step = end
        return np.unique(np.concatenate(parts))


def gather_step(
    dataset: Dataset, step: int, rows: np.ndarray, exclude_context: bool = False
) -> StepData:
    """Read step `step`'s samples `rows` (B,) and their positives' bank vectors, and with
    `exclude_context` their context items' ids (for seen-item masking)."""
    contexts, lengths, positive_ids = dataset.gather(rows)
    positive_vecs = np.asarray(dataset.bank[positive_ids], dtype=np.float32)
    seen = dataset.seen_ids(rows) if exclude_context else None
    return StepData(step, rows, contexts, lengths, positive_ids, positive_vecs, seen)


class StepRows(Protocol):
    """What Prefetcher reads: the rows of a step (a StepPlan, or one rank's share of it)."""

    def rows_for(self, step: int) -> np.ndarray:
        """(n,) dataset rows of step `step`."""
        ...


class Prefetcher:
    """Gathers step s + 1's data in a background thread while step s computes."""

    def __init__(self, dataset: Dataset, plan: StepRows, exclude_context: bool = False):
        self.dataset = dataset
        self.plan = plan
        self.exclude_context = exclude_context
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twotower-prefetch")
        self._pending: tuple[int, Future[StepData]] | None = None

    def get(self, step: int) -> StepData:
        """Step `step`'s data (gathered now if it was not prefetched), and start on the next."""
        if self._pending is not None and self._pending[0] == step:
            data = self._pending[1].result()
        else:
            data = gather_step(self.dataset, step, self.plan.rows_for(step), self.exclude_context)
        nxt = step + 1
        rows = self.plan.rows_for(nxt)
        self._pending = (
            nxt,
            self._pool.submit(gather_step, self.dataset, nxt, rows, self.exclude_context),
        )
        return data

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def assemble_batch(
    data: StepData,
    table: HardNegativeTable,
    queue: MemoryQueue,
    bank: np.ndarray,
    hard_negatives: int,
    seed: int,
    first_row: int = 0,
    from_bank: BankNegatives | None = None,
) -> Batch:
    """Step data + K ids sampled from the mined table (SeedSequence([seed, step, purpose]))
    + the queue as it is now (+ the context ids, when the data carries them: seen-item
    masking) + what `from_bank` adds (the full bank, or S rows drawn for the step, and
    logQ). bank (M, D) is read only at the sampled rows.

    Under torchrun, data holds the global batch's rows and positives but only one rank's
    b contexts (and context ids), rows [first_row, first_row + b): the draw is the global
    batch's (the same numbers as in one process) and the rank keeps its queries' share.
    """
    rng = step_rng(seed, data.step, HARD_NEGATIVES)
    queries = slice(first_row, first_row + len(data.contexts))
    hard_ids = table.sample(data.rows, hard_negatives, rng)[queries]
    hard_vecs = np.asarray(bank[np.maximum(hard_ids, 0).ravel()], dtype=np.float32)
    batch = Batch(
        contexts=data.contexts,
        lengths=data.lengths,
        positive_ids=data.positive_ids,
        positive_vecs=data.positive_vecs,
        hard_ids=hard_ids,
        hard_vecs=hard_vecs.reshape(len(hard_ids), hard_negatives, bank.shape[1]),
        queue_ids=queue.ids,
        queue_vecs=queue.vecs,
        context_ids=data.context_ids,
    )
    return batch if from_bank is None else from_bank.add_to(batch, seed, data.step)

"""One training step, shared by the trainer and `twotower replay` so the two cannot drift:
put a refresh's table into use when one is due, assemble the batch, step the engine at the
step's learning rate, push the batch's positives into the queue.

`prepare` is the first half (everything up to the Batch; replay stops there at the step it
rebuilds) and `update` the second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from twotower.backends import Backend
from twotower.batch import Batch, StepStats
from twotower.config import TrainConfig
from twotower.training.batching import StepData, StepPlan, assemble_batch
from twotower.training.negatives.bank_negatives import BankNegatives
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.queue import MemoryQueue
from twotower.training.negatives.refresh import MiningSchedule
from twotower.training.ranks.solo import RunGroup
from twotower.training.schedule import LRSchedule


class Refreshes(Protocol):
    """Where the mined tables come from: the trainer's `Refresher`, or replay's saved ones."""

    def take(self, step: int) -> None:
        """If a refresh is taken at `step`, encode its queries (with the parameters now)."""
        ...

    def use(self, step: int) -> HardNegativeTable:
        """The (N, pool) table the refresh used at `step` mined."""
        ...


@dataclass
class StepState:
    """What a step reads and changes besides its rows: the engine, the queue, the mined table
    in use, and the run's fixed plan (rows per step, refresh and learning-rate schedules,
    what each step takes from the whole bank)."""

    config: TrainConfig
    bank: np.ndarray  # (M, D) the frozen document vectors
    plan: StepPlan
    mining: MiningSchedule
    schedule: LRSchedule
    backend: Backend
    queue: MemoryQueue
    table: HardNegativeTable
    from_bank: BankNegatives


@dataclass
class Prepared:
    """Step s ready to update: its data (the global batch's positives) and its Batch."""

    data: StepData
    batch: Batch


@dataclass
class Updated:
    """What an update did: the engine's stats, the learning rate, seconds in the engine."""

    stats: StepStats
    lr: float
    seconds: float


def prepare(
    step: int, data: StepData, state: StepState, refreshes: Refreshes, group: RunGroup
) -> Prepared:
    """Step `step` up to its Batch: take and use refreshes when due (state.table changes at a
    use step), gather the global batch's positives (torchrun), draw the hard negatives, read
    the queue as it stands and add what `state.from_bank` takes from the whole bank.
    data: this process's rows of the step (`gather_step`)."""
    c = state.config
    if c.hard_negatives:
        refreshes.take(step)
        if state.mining.is_use(step):
            state.table = refreshes.use(step)
    data = group.gather_positives(data, state.plan.rows_for(step))
    batch = assemble_batch(
        data,
        state.table,
        state.queue,
        state.bank,
        c.hard_negatives,
        c.seed,
        group.first_row(c.batch_size),
        state.from_bank,
    )
    return Prepared(data, batch)


def update(step: int, prepared: Prepared, state: StepState, poison: bool = False) -> Updated:
    """Step the engine on the prepared batch at step `step`'s learning rate, then push the
    batch's positives into the queue. poison: the injected `nan` fault (the loss goes NaN)."""
    batch = prepared.batch
    lr = state.schedule.at(step)
    if poison:
        batch.contexts = batch.contexts.copy()
        batch.contexts[:, 0] = np.nan
    started = time.perf_counter()
    stats = state.backend.step(batch, lr)
    seconds = time.perf_counter() - started
    data = prepared.data
    state.queue.push(data.positive_ids, data.positive_vecs)
    return Updated(stats, lr, seconds)

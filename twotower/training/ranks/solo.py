"""A run of one process, behind the interface of `distributed.Group`, so the loop reads the
same for one process and for W torchrun ranks: barriers return at once, a flag is this
process's own, the batch is the whole one, and refreshes are mined the plain way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from twotower.backends import Backend
from twotower.run.rundir import RunDir
from twotower.training.batching import StepData, StepPlan
from twotower.training.negatives.refresh import run_refresh
from twotower.training.ranks.distributed import Group

_T = TypeVar("_T")


class Solo:
    """The only process of a run: it writes the run files and has nobody to wait for."""

    writes_run_files = True
    searches_beside_training = True  # a refresh may be searched in a thread (the config says)

    def heartbeat_path(self, run: RunDir) -> Path:
        """The run's heartbeat file."""
        return run.heartbeat

    def cores(self, usable: int) -> int:
        """Every one of the `usable` cores."""
        return usable

    def arms_faults(self) -> bool:
        """Always: $TWOTOWER_INJECT_FAULT is this process's."""
        return True

    def rows(self, plan: StepPlan) -> StepPlan:
        """What this process gathers of each step: the whole batch."""
        return plan

    def first_row(self, batch_size: int) -> int:
        """Its queries start the batch."""
        return 0

    def join_backend(self, backend: Backend) -> None:
        """Nothing to join: the engine's gradients are the whole batch's."""

    def meet(self, run: RunDir) -> None:
        """Nobody to wait for."""

    def close(self) -> None:
        """Nothing to leave."""

    def barrier(self) -> None:
        """Nobody to wait for."""

    def rank_zero_first(self, make: Callable[[], _T]) -> _T:
        """make(): this process is rank 0."""
        return make()

    def any(self, flag: bool) -> bool:
        """`flag`: no other process has one."""
        return flag

    def collective_fields(self, backend: Backend) -> dict[str, float]:
        """None: a step record has no collective time."""
        return {}

    def gather_positives(self, data: StepData, global_rows: np.ndarray) -> StepData:
        """`data` as it is: it holds the whole batch."""
        return data

    # `run_refresh`: the whole refresh with the miner, its recall probed against the exact one
    mine_refresh = staticmethod(run_refresh)


RunGroup = Group | Solo  # the processes of a run: W torchrun ranks, or one

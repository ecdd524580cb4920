"""The learning rate of every step: a pure function of the step number and the config.

The formula is the reference's (`reference.optim.lr_factor`, docs/DESIGN.md's f(s)): the
trainer, not an engine, computes the rate and hands it to `Backend.step`, so there is one
definition and the engines are checked on what they do with it. Nothing about it is stored in
a checkpoint: a resumed run recomputes the same rate for the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reference.optim import lr_factor
from twotower.config import TrainConfig


@dataclass(frozen=True)
class LRSchedule:
    """lr: the peak rate; schedule: constant | linear | cosine after warm-up; warmup: W steps;
    total: S, the run's planned steps."""

    lr: float
    schedule: str
    warmup: int
    total: int

    @classmethod
    def of(cls, config: TrainConfig, total: int) -> LRSchedule:
        """The schedule of a run of `total` planned steps. --warmup-steps wins over
        --warmup-share; a share is rounded up, so any share > 0 warms up at least one step."""
        if config.warmup_steps is not None:
            warmup = config.warmup_steps
        else:
            warmup = math.ceil(round(config.warmup_share * total, 9))  # 0.07 * 100 is 7, not 8
        return cls(config.lr, config.lr_schedule, warmup, total)

    def at(self, step: int) -> float:
        """The rate of the update made when `step` steps are done (0-based)."""
        return self.lr * lr_factor(step, self.schedule, self.warmup, self.total)


def planned_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """S: --steps, else --epochs x batches per epoch (rounded up, at least 1)."""
    return config.steps or max(1, math.ceil(config.epochs * batches_per_epoch))

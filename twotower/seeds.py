"""Every random draw of a run, keyed so that a resumed run needs only the step.

Keys have distinct lengths, so the streams never collide:
    init             SeedSequence([seed, 0, 0, 0])
    epoch order      SeedSequence([seed, epoch])
    step s, purpose  SeedSequence([seed, s, purpose])
"""

from __future__ import annotations

import numpy as np

HARD_NEGATIVES = 1  # purpose: which mined ids a step samples
EVAL_SPLIT = 2  # purpose key of the held-out split (drawn once, at "step" 0)
SAMPLED = 3  # purpose: which bank rows a step samples as negatives (--bank-negatives sampled)


def init_rng(seed: int) -> np.random.Generator:
    """The generator for initial parameters."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0, 0, 0]))


def epoch_order(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """rows (N,) shuffled by permutation(SeedSequence([seed, epoch]))."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(rows)


def step_rng(seed: int, step: int, purpose: int) -> np.random.Generator:
    """The generator for one purpose at one step (step = steps completed before it)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, purpose]))

"""twotower: a two-tower dense-retrieval trainer that survives native crashes,
explains them, and proves that the engine it switched to computes the same numbers.
"""

from __future__ import annotations

from twotower import backends
from twotower.batch import Batch, StepStats
from twotower.towers import TowerSpec

__all__ = ["Batch", "StepStats", "TowerSpec", "backends"]
__version__ = "0.1.0"

"""twotower: a two-tower dense-retrieval trainer that survives native crashes,
explains them, and proves that the engine it switched to computes the same numbers.

    import twotower
    config = twotower.TrainConfig(data="data/", backend="torch-cpu", miner="faiss")
    result = twotower.train(config)        # in this process
    result = twotower.supervise(config)    # in a child: restarts, fallbacks, crash reports

Importing twotower loads no native engine (torch, faiss, hnswlib): engines are
imported when one is made.
"""

from __future__ import annotations

from twotower import backends, miners
from twotower.batch import Batch, StepStats
from twotower.config import TrainConfig
from twotower.data import Dataset, convert, load_dataset, synthesize
from twotower.guard.supervisor import supervise
from twotower.guard.worker_reports import train
from twotower.serve.load import load_tower
from twotower.towers import TowerSpec
from twotower.training.checkpoint import load_checkpoint
from twotower.training.trainer import RunResult

__all__ = [
    "Batch",
    "Dataset",
    "RunResult",
    "StepStats",
    "TowerSpec",
    "TrainConfig",
    "backends",
    "convert",
    "load_checkpoint",
    "load_dataset",
    "load_tower",
    "miners",
    "supervise",
    "synthesize",
    "train",
]
__version__ = "0.1.0"

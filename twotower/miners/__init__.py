"""Nearest-neighbour miners by name: `available()`, `describe()`, `get(name, **opts)`.

    exact     blocked GEMM over the memory-mapped bank; the oracle for the others
    faiss     any faiss index factory string (Flat, HNSW32, IVF4096,Flat, ...)
    hnswlib   HNSW graph in hnswlib's 'ip' space

Every miner returns (scores, ids) with scores as dot products, best first.
"""

from __future__ import annotations

from typing import Any

from twotower.miners.base import Miner, MinerCrashed
from twotower.registry import EngineInfo, EngineRegistry, missing_module_reason

__all__ = ["Miner", "MinerCrashed", "EngineInfo", "available", "describe", "get", "NAMES"]

REGISTRY = EngineRegistry(
    "miner",
    {
        "exact": lambda: None,
        "faiss": missing_module_reason("faiss", "faiss-cpu"),
        "hnswlib": missing_module_reason("hnswlib", "hnswlib"),
    },
)
NAMES = REGISTRY.names
describe = REGISTRY.describe
available = REGISTRY.available


def get(name: str, **opts: Any) -> Miner:
    """A miner ready for `build(bank)`. Raises EngineUnavailable for an unknown or missing one."""
    REGISTRY.require(name)
    from twotower.miners.exact import ExactMiner

    return ExactMiner(**opts)

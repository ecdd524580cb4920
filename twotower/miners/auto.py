"""`--miner auto`: exact while a refresh is cheap, an IVF index beyond, and why.

An exact refresh costs 2 x queries x rows x dim flops. While that stays under
EXACT_REFRESH_SECONDS at ASSUMED_FLOPS (about this project's 2-core machine),
exact is the choice: it builds nothing and its recall is 1. Beyond, faiss
IVF{nlist},Flat with nlist about 4 sqrt(rows) (`faiss_miner.lists_that_fit`)
and nprobe chosen after the build as the smallest that reaches TARGET_RECALL
against exact on a seeded sample of bank rows (`FaissMiner(target_recall=)`);
without faiss, hnswlib with its defaults; without either, exact anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twotower.config import DEFAULT_TARGET_RECALL
from twotower.miners.exact import ASSUMED_FLOPS
from twotower.miners.faiss_miner import lists_that_fit

EXACT_REFRESH_SECONDS = 20.0
TARGET_RECALL = DEFAULT_TARGET_RECALL


@dataclass(frozen=True)
class MinerChoice:
    """What `choose_miner` picked: the miner's name, TrainConfig fields to set
    ({"faiss_index": "IVF1024,Flat", "faiss_target_recall": 0.95}) and the reason in words."""

    miner: str
    settings: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def choose_miner(rows: int, dim: int, queries: int, available: Sequence[str]) -> MinerChoice:
    """The miner for refreshes of `queries` query vectors over a rows x dim bank, among the
    `available` miner names."""
    seconds = 2.0 * queries * rows * dim / ASSUMED_FLOPS
    cost = (
        f"an exact refresh of {queries:,} queries over {rows:,} x {dim} rows is about "
        f"{seconds:.0f} s at {ASSUMED_FLOPS / 1e9:.0f} GFLOP/s"
    )
    if seconds <= EXACT_REFRESH_SECONDS:
        return MinerChoice("exact", reason=f"{cost} (at most {EXACT_REFRESH_SECONDS:.0f} s)")
    if "faiss" in available:
        lists = lists_that_fit(rows)
        return MinerChoice(
            "faiss",
            {"faiss_index": f"IVF{lists},Flat", "faiss_target_recall": TARGET_RECALL},
            f"{cost}; IVF{lists} (about 4 sqrt(rows) lists), nprobe the smallest reaching "
            f"recall {TARGET_RECALL} against exact on sampled bank rows",
        )
    if "hnswlib" in available:
        return MinerChoice("hnswlib", reason=f"{cost}; faiss is not installed")
    return MinerChoice("exact", reason=f"{cost}, but neither faiss nor hnswlib is installed")

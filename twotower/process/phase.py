"""The phases a run's processes name: in the heartbeat, at the fault switch's points, as progress
tasks, and in crash reports. One spelling each, so that renaming one cannot silently change which
engine the supervisor blames for a crash in it (`MINER_PHASES`) or where a fault can be injected.
"""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    """A phase's name; compares, hashes, formats and serialises (JSON) as its plain string."""

    LOAD = "load"
    BUILD_INDEX = "build-index"
    LOAD_INDEX = "load-index"
    SEARCH = "search"
    ENCODE = "encode"
    MINE = "mine"
    STEP = "step"
    EVALUATE = "evaluate"
    CHECKPOINT = "checkpoint"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# where TWOTOWER_INJECT_FAULT=KIND@PHASE:STEP may fire
INJECTABLE = (
    Phase.LOAD,
    Phase.BUILD_INDEX,
    Phase.ENCODE,
    Phase.MINE,
    Phase.STEP,
    Phase.CHECKPOINT,
)
# a crash in one of these is the miner's: its fallback chain answers it, not the backend's
MINER_PHASES = frozenset({Phase.MINE, Phase.BUILD_INDEX, Phase.LOAD_INDEX, Phase.SEARCH})

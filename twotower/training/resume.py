"""Where a run starts: refuse to overwrite an earlier run, refuse a resume that changes the
numbers, and load the newest verified checkpoint (engine, queue, mined table, the refresh
in flight, the model selection)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower.backends import Backend
from twotower.config import TrainConfig
from twotower.errors import UsageError
from twotower.run.rundir import RunDir
from twotower.run.settings import read_settings
from twotower.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_record,
    step_dir_name,
)
from twotower.training.evaluation.selection import Selection
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.queue import MemoryQueue
from twotower.training.negatives.refresh import MiningSchedule, Refresh, load_refresh

log = logging.getLogger("twotower")


def check_run_dir(config: TrainConfig, run: RunDir) -> dict[str, Any] | None:
    """The run's stored config when resuming (None: none stored, or a fresh run).

    Raises UsageError for a fresh run over one with checkpoints, an unreadable config.json,
    or a resume whose numeric settings (`TrainConfig.numeric_differences`) differ."""
    has_checkpoints = bool(list_checkpoints(run.root)) if run.root.exists() else False
    if not config.resume:
        if has_checkpoints:
            raise UsageError(
                f"{run.root} already holds checkpoints of an earlier run; "
                "pass --resume to continue it or choose another --out"
            )
        return None
    if not run.config.exists():
        return None
    stored = read_settings(run.root)
    differences = config.numeric_differences(stored)
    if differences and has_checkpoints:
        raise UsageError(
            f"{run.config}: --resume with settings that change the numbers "
            f"({'; '.join(differences)}); leave them out to continue with the run's own, "
            "or start a new run with another --out"
        )
    return stored


@dataclass
class Restored:
    """Where the run starts: `step` (steps done), the checkpoint's metrics and selection, the
    mined table in use and its file (None: none yet), the refresh in flight (None: none),
    the mining miner's search parameters as the run had raised them ({}: as tuned)."""

    step: int
    selection: Selection
    table: HardNegativeTable
    metrics: dict[str, float] = field(default_factory=dict)
    table_path: Path | None = None
    pending: Refresh | None = None
    search_params: dict[str, int] = field(default_factory=dict)


def restore(
    config: TrainConfig,
    run: RunDir,
    backend: Backend,
    queue: MemoryQueue,
    table: HardNegativeTable,
    mining: MiningSchedule,
) -> Restored:
    """Load the newest verified checkpoint into `backend` and `queue` when resuming; a fresh
    start (step 0, `table`, a fresh selection) when there is none. Raises UsageError when no
    checkpoint verifies."""
    fresh = Selection(config.select_metric)
    if not (config.resume and list_checkpoints(run.root)):
        return Restored(0, fresh, table)
    try:
        meta, state = load_record(run.root)
    except CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    backend.load_state(state)
    queue.load_state(state)
    table_path = None
    if meta.mined_table:
        table_path = run.mined / meta.mined_table
        table = HardNegativeTable.load(table_path)
    pending = load_refresh(meta.mining, run.mined, mining) if meta.mining else None
    step = meta.step
    log.info("resumed from %s (step %d, made on %s)", step_dir_name(step), step, meta.backend)
    selection = Selection.restore(config.select_metric, meta.selection)
    metrics, params = dict(meta.metrics), dict(meta.search_params)
    return Restored(step, selection, table, metrics, table_path, pending, params)

"""`twotower eval`: a run's tower (its best, latest or step-N checkpoint), or an untrained one,
beside the parameter-free baselines on the run's held-out rows or on every row of a dataset.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twotower import miners
from twotower.backends import make_backend
from twotower.config import TrainConfig
from twotower.data import load_dataset
from twotower.errors import UsageError
from twotower.paths import shown_path, user_cache_dir
from twotower.run.settings import SETTINGS_NAME, find_run, read_settings
from twotower.training.checkpoint import (
    CheckpointError,
    choose_checkpoint,
    describe_choice,
    load_checkpoint,
)
from twotower.training.evaluation.heldout import held_out
from twotower.training.evaluation.metrics import Comparison, evaluate, evaluate_baselines

ROWS = ("held-out", "all")


def log_to_stderr() -> None:
    """Send the 'twotower' logger's progress lines to stderr (the CLI has no run directory)."""
    logger = logging.getLogger("twotower")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("twotower: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@dataclass
class EvalReport:
    """What `twotower eval` found: the comparison, how many rows of which data, which split
    ('all' for every row), and the checkpoint's step (None: an untrained tower)."""

    comparison: Comparison
    rows: int
    data: str
    split: str
    step: int | None

    def lines(self) -> list[str]:
        """The printed report: where the numbers come from, the table, the verdict."""
        where = f"step {self.step}" if self.step is not None else "untrained"
        header = f"{self.rows} queries of {shown_path(self.data)} ({self.split}); tower: {where}"
        return [header, *self.comparison.table()]


def _checkpoint_of(run: Path, checkpoint: str | None) -> tuple[int, dict[str, np.ndarray]]:
    """The step and state of `run`'s checkpoint `checkpoint` (a run directory: named on the log
    by `describe_choice`), or of `run` itself (a store or a checkpoint directory)."""
    try:
        if not (run / SETTINGS_NAME).is_file():
            meta, state = load_checkpoint(run)
            return int(meta["step"]), state
        which, source = choose_checkpoint(run, checkpoint)
        meta, state = load_checkpoint(source)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    for line in describe_choice(run, which, int(meta["step"])):
        logging.getLogger("twotower").info(line)
    return int(meta["step"]), state


def evaluate_run(
    run: str | None = None,
    data: str | None = None,
    tower: str | None = None,
    proj: bool = True,
    backend: str = "auto",
    miner: str = "exact",
    seed: int | None = None,
    max_eval: int | None = None,
    exclude_context: bool | None = None,
    checkpoint: str | None = None,
    rows: str = "held-out",
) -> EvalReport:
    """Evaluate a run's checkpoint (`checkpoint`: best, latest or step-N; None: best/ where
    the run kept one, else latest, as every command; named on the log), or without `run`
    a freshly initialised tower (meanpool with proj=False is the mean-of-context baseline
    itself), next to the baselines on the same rows. rows: 'held-out' (the run's split of the
    data, or of `data`) or 'all' (every row of `data`: a test set of the user's own).
    exclude_context: seen-item masking of the ranking (None: as the run trained). Raises
    UsageError."""
    if rows not in ROWS:
        raise UsageError(f"--rows must be one of {', '.join(ROWS)}, got {rows!r}")
    settings: dict[str, Any] = {}
    state = None
    step = None
    if run is not None:
        settings = read_settings(find_run(run))  # as the version that wrote it meant
        step, state = _checkpoint_of(Path(run), checkpoint)
    config = TrainConfig.from_dict(
        {
            **settings,
            **({"data": data} if data else {}),
            **({"tower": tower} if tower else {}),
            **({"seed": seed} if seed is not None else {}),
            **({"max_eval": max_eval} if max_eval is not None else {}),
            **({"exclude_context": exclude_context} if exclude_context is not None else {}),
            **({"eval_data": None, "eval_split": "auto"} if data else {}),
            "proj": proj and settings.get("proj", True),
            "backend": backend,
            "resume": False,
        }
    )
    dataset = load_dataset(config.data)  # type: ignore[arg-type]  # validate() ensures a path
    config = config.for_data(dataset.context_ids is not None)
    if rows == "all":
        eval_dataset, eval_rows, split = dataset, np.arange(dataset.num_samples), "every row"
    else:
        split_of = held_out(config, dataset)
        eval_dataset, eval_rows, split = split_of.eval_dataset, split_of.eval_rows, split_of.kind
        split = f"held-out, {split} split" if split != "eval-data" else "the run's --eval-data"
    engine = make_backend(config, eval_dataset.dim)
    if state is not None:
        engine.load_state(state)
    search = miners.get_for(config, miner, user_cache_dir() / "index", fault_phase=None)
    search.build(eval_dataset.bank, fingerprint=eval_dataset.fingerprint)
    masking = bool(config.exclude_context)
    comparison = Comparison(
        evaluate(engine, eval_dataset, eval_rows, search, masking),
        evaluate_baselines(eval_dataset, eval_rows, search, masking),
        config.select_metric,
    )
    return EvalReport(comparison, len(eval_rows), str(eval_dataset.path), split, step)

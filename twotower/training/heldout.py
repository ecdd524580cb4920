"""Which rows train and which are held out for evaluation: a random split, a split by group
(groups.npy: no source has rows on both sides), or an explicit validation set (--eval-data).

Where sequences overlap (sliding windows over one document or one user's history), a random
held-out row shares its context and positive with training rows, so its metric rewards
memorising; a split by group does not. `held_out` is the one place that decides, for the
trainer, `twotower eval` and replay alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twotower.config import TrainConfig
from twotower.data import Dataset, group_holdout_split, holdout_split, load_dataset
from twotower.errors import UsageError
from twotower.seeds import EVAL_SPLIT


@dataclass(eq=False)
class HeldOut:
    """train_rows (n,) int64: rows of the training dataset the steps draw from;
    eval_rows (m,) int64: rows of `eval_dataset` that evaluations rank;
    eval_dataset: the training dataset, or the validation set of --eval-data;
    kind: random | group | eval-data."""

    train_rows: np.ndarray
    eval_rows: np.ndarray
    eval_dataset: Dataset
    kind: str

    def describe(self) -> str:
        """One line for the log: which split, how many rows on each side."""
        what = {
            "random": "a random split of the samples (rows of one source may sit on both sides)",
            "group": "a split by groups.npy (no group on both sides)",
            "eval-data": f"the validation set {self.eval_dataset.path}",
        }[self.kind]
        return (
            f"held-out: {len(self.eval_rows)} queries from {what}; "
            f"{len(self.train_rows)} training rows"
        )


def held_out_split(
    num_samples: int, eval_fraction: float, max_eval: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a random split: the same for training and `twotower eval`."""
    return holdout_split(num_samples, eval_fraction, max_eval, split_seed(seed))


def split_seed(seed: int) -> int:
    """The seed of a run's held-out split, apart from every other stream of the run."""
    return seed * 1000 + EVAL_SPLIT


def split_kind(config: TrainConfig, dataset: Dataset) -> str:
    """random | group | eval-data for this config and dataset; UsageError when impossible."""
    if config.eval_data is not None:
        if config.eval_split != "auto":
            raise UsageError(
                f"--eval-split {config.eval_split} and --eval-data both choose the held-out "
                "rows; give one"
            )
        return "eval-data"
    if config.eval_split == "group" and dataset.groups is None:
        raise UsageError(
            f"{dataset.path}: --eval-split group needs groups.npy (N,) beside the other arrays"
        )
    if config.eval_split == "auto":
        return "group" if dataset.groups is not None else "random"
    return config.eval_split


def held_out(config: TrainConfig, dataset: Dataset) -> HeldOut:
    """The run's split of `dataset` (and its --eval-data), a pure function of the config
    and the data: every resume, `twotower eval` and replay see the same rows."""
    kind = split_kind(config, dataset)
    seed = split_seed(config.seed)
    if kind == "eval-data":
        assert config.eval_data is not None
        validation = load_dataset(config.eval_data)
        if validation.dim != dataset.dim:
            raise UsageError(
                f"{config.eval_data}: vectors of size {validation.dim}, but the training "
                f"data's are {dataset.dim}"
            )
        rows = np.arange(validation.num_samples, dtype=np.int64)
        if len(rows) > config.max_eval:
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
            rows = np.sort(rng.choice(rows, size=config.max_eval, replace=False))
        return HeldOut(np.arange(dataset.num_samples, dtype=np.int64), rows, validation, kind)
    if kind == "group":
        assert dataset.groups is not None
        train, held = group_holdout_split(
            dataset.groups, config.eval_fraction, config.max_eval, seed
        )
    else:
        train, held = holdout_split(
            dataset.num_samples, config.eval_fraction, config.max_eval, seed
        )
    return HeldOut(train, held, dataset, kind)

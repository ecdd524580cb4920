"""Which rows train and which are held out for evaluation: a random split, a split by group
(groups.npy: no source has rows on both sides), or an explicit validation set (--eval-data).

Where sequences overlap (sliding windows over one document or one user's history), a random
held-out row shares its context and positive with training rows, so its metric rewards
memorising; a split by group does not. `held_out` is the one place that decides, for the
trainer, `twotower eval`, `encode --rows` and replay alike; `held_out_split` and
`group_held_out_split` are its random and group splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twotower.config import TrainConfig
from twotower.data import Dataset, load_dataset
from twotower.errors import UsageError
from twotower.seeds import EVAL_SPLIT

HELD_OUT_PURPOSE = 0x401D  # SeedSequence key of the random and group splits


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


def split_seed(seed: int) -> int:
    """The seed of a run's held-out split, apart from every other stream of the run."""
    return seed * 1000 + EVAL_SPLIT


def held_out_split(
    num_samples: int, eval_fraction: float, max_eval: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The random split: range(num_samples) as (train_rows, eval_rows), int64, sorted, disjoint.

    eval_rows holds min(max_eval, floor(num_samples * eval_fraction)) rows,
    leaving at least one training row, chosen by a permutation seeded by the run's `seed`
    alone (the same on every machine and every resume, for training and `twotower eval`).
    """
    if num_samples < 1:
        raise UsageError(f"cannot split {num_samples} samples; the dataset is empty")
    if not 0.0 <= eval_fraction < 1.0:
        raise UsageError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if max_eval < 0:
        raise UsageError(f"max eval rows must be >= 0, got {max_eval}")
    num_eval = min(max_eval, int(num_samples * eval_fraction), num_samples - 1)
    rng = np.random.default_rng(np.random.SeedSequence([split_seed(seed), HELD_OUT_PURPOSE]))
    order = rng.permutation(num_samples)
    return np.sort(order[num_eval:]), np.sort(order[:num_eval])


def group_held_out_split(
    groups: np.ndarray, eval_fraction: float, max_eval: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split samples by group: (train_rows, eval_rows), int64, sorted, disjoint, and no group
    with rows on both sides.

    groups (N,): each sample's group id (read whole: one integer per sample). Whole groups,
    in an order seeded by the run's `seed` alone, are held out until they hold at least
    min(max_eval, floor(N * eval_fraction)) rows; at least one group stays for training.
    When the held-out groups hold more than max_eval rows, eval_rows is a seeded sample of
    max_eval of them; the rest of those groups is used by neither side.
    """
    groups = np.asarray(groups)
    num_samples = len(groups)
    if num_samples < 1:
        raise UsageError(f"cannot split {num_samples} samples; the dataset is empty")
    names, group_of_row = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        raise UsageError(
            f"groups.npy holds a single group ({names[0]}): a split by group needs two or more; "
            "use --eval-split random"
        )
    target = max(1, min(max_eval, int(num_samples * eval_fraction)))
    rng = np.random.default_rng(np.random.SeedSequence([split_seed(seed), HELD_OUT_PURPOSE, 1]))
    order = rng.permutation(len(names))
    sizes = np.bincount(group_of_row, minlength=len(names))[order]
    taken = min(int(np.searchsorted(np.cumsum(sizes), target)) + 1, len(names) - 1)
    held = np.zeros(len(names), dtype=bool)
    held[order[:taken]] = True
    is_held = held[group_of_row]
    eval_rows = np.flatnonzero(is_held)
    if len(eval_rows) > max_eval:
        eval_rows = np.sort(rng.choice(eval_rows, size=max_eval, replace=False))
    return np.flatnonzero(~is_held).astype(np.int64), eval_rows.astype(np.int64)


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
            rng = np.random.default_rng(np.random.SeedSequence([split_seed(config.seed), 0xE7A1]))
            rows = np.sort(rng.choice(rows, size=config.max_eval, replace=False))
        return HeldOut(np.arange(dataset.num_samples, dtype=np.int64), rows, validation, kind)
    if kind == "group":
        assert dataset.groups is not None
        train, held = group_held_out_split(
            dataset.groups, config.eval_fraction, config.max_eval, config.seed
        )
    else:
        train, held = held_out_split(
            dataset.num_samples, config.eval_fraction, config.max_eval, config.seed
        )
    return HeldOut(train, held, dataset, kind)

"""The held-out split: by group when the data has groups.npy (no group on both sides), random
otherwise or on request, or an explicit validation set; the log says which."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.datasets import small_arrays, write_dir
from twotower.config import TrainConfig
from twotower.data import load_dataset, synthesize
from twotower.errors import UsageError
from twotower.run.rundir import read_metrics
from twotower.training.evaluation.heldout import group_held_out_split, held_out, held_out_split
from twotower.training.trainer import train


def uneven_groups(num_samples: int, seed: int) -> np.ndarray:
    """Group ids of very different sizes (1 to ~60 rows), shuffled over the rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, size=num_samples)
    groups = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)[:num_samples]  # ids need not be 0..G
    return rng.permutation(groups)


@pytest.mark.parametrize("seed", range(5))
def test_no_group_has_rows_on_both_sides(seed: int) -> None:
    groups = uneven_groups(3000, seed)
    train_rows, eval_rows = group_held_out_split(groups, 0.05, 100, seed)
    assert not set(groups[train_rows]) & set(groups[eval_rows])
    assert len(eval_rows) == 100  # more held-out rows than max_eval: a sample of them
    assert len(np.intersect1d(train_rows, eval_rows)) == 0
    # every row of a held-out group is out of training, sampled for evaluation or not
    held_groups = np.isin(groups, groups[eval_rows])
    assert np.array_equal(np.sort(train_rows), np.flatnonzero(~held_groups))
    assert 100 <= held_groups.sum() < 100 + 60  # whole groups up to max_eval rows
    again = group_held_out_split(groups, 0.05, 100, seed)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train_rows, eval_rows), strict=True))


def test_a_random_split_does_put_groups_on_both_sides() -> None:
    """The negative control: the leak the group split exists to prevent is real."""
    groups = uneven_groups(3000, 0)
    train_rows, eval_rows = held_out_split(3000, 0.05, 100, 0)
    assert set(groups[train_rows]) & set(groups[eval_rows])


def test_one_group_cannot_be_split() -> None:
    with pytest.raises(UsageError, match="single group"):
        group_held_out_split(np.zeros(50, dtype=np.int64), 0.1, 10, 0)


def grouped_dataset(tmp_path: Path) -> Path:
    data = synthesize(tmp_path / "data", samples=600, bank=300, dim=8, seq_len=5, seed=1)
    np.save(data.path / "groups.npy", np.arange(600) // 20)  # 30 groups of 20 rows
    return data.path


def test_the_trainer_splits_by_group_by_default_and_says_so(tmp_path: Path) -> None:
    path = grouped_dataset(tmp_path)
    groups = np.load(path / "groups.npy")
    out = tmp_path / "run"
    config = TrainConfig(
        data=str(path), out=str(out), backend="numpy", hidden=8, steps=4, supervise=False
    )
    train(config)
    start = next(r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "start")
    assert start["split"] == "group"
    assert "split by groups.npy (no group on both sides)" in (out / "log.txt").read_text()
    split = held_out(config, load_dataset(path))
    assert not set(groups[split.train_rows]) & set(groups[split.eval_rows])
    assert len(split.eval_rows) == 40  # 5% of 600 is 30: two whole groups of 20
    random = held_out(TrainConfig(data=str(path), eval_split="random"), load_dataset(path))
    assert random.kind == "random" and set(groups[random.train_rows]) & set(
        groups[random.eval_rows]
    )


def test_group_split_needs_groups(tmp_path: Path) -> None:
    path = write_dir(tmp_path / "data", small_arrays())
    with pytest.raises(UsageError, match="--eval-split group needs groups.npy"):
        held_out(TrainConfig(data=str(path), eval_split="group"), load_dataset(path))


def test_eval_data_is_a_validation_set_and_every_training_row_trains(tmp_path: Path) -> None:
    path = grouped_dataset(tmp_path)
    validation = synthesize(tmp_path / "val", samples=50, bank=30, dim=8, seq_len=5, seed=9).path
    config = TrainConfig(data=str(path), eval_data=str(validation), max_eval=40)
    split = held_out(config, load_dataset(path))
    assert split.kind == "eval-data" and split.eval_dataset.path == validation
    assert np.array_equal(split.train_rows, np.arange(600))
    assert len(split.eval_rows) == 40 and set(split.eval_rows) <= set(range(50))
    with pytest.raises(UsageError, match="give one"):
        held_out(
            TrainConfig(data=str(path), eval_data=str(validation), eval_split="random"),
            load_dataset(path),
        )
    other_dim = synthesize(tmp_path / "d4", samples=50, bank=30, dim=4, seq_len=5, seed=9).path
    with pytest.raises(UsageError, match="vectors of size 4"):
        held_out(TrainConfig(data=str(path), eval_data=str(other_dim)), load_dataset(path))


def test_encode_rows_of_an_exported_grouped_run_are_the_trainers_split(tmp_path: Path) -> None:
    """`twotower encode --rows heldout|train` from an export rebuilds the run's own split, by
    group here, not a random split of the same size."""
    from twotower.serve.encode import select_rows
    from twotower.serve.export import tower_from_run

    data = grouped_dataset(tmp_path)
    run = tmp_path / "run"
    config = TrainConfig(data=str(data), out=str(run), backend="numpy", hidden=8, steps=4)
    train(config)
    dataset = load_dataset(data)
    groups = np.load(data / "groups.npy")
    split = tower_from_run(run).doc["split"]
    heldout = select_rows(dataset, "held-out", split)
    training = select_rows(dataset, "train", split)
    assert not set(groups[heldout]) & set(groups[training])
    logged = read_metrics(run / "metrics.jsonl")[0]["eval"]
    assert len(heldout) == logged
    _, random_held = held_out_split_random(config, dataset.num_samples)
    assert not np.array_equal(heldout, random_held)  # the control: the old, leaky rebuild


def held_out_split_random(config: TrainConfig, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The random split of the same size and seed (what encode used to rebuild)."""
    return held_out_split(num_samples, config.eval_fraction, config.max_eval, config.seed)


def test_held_out_split() -> None:
    train, held = held_out_split(1000, 0.1, 50, seed=4)
    assert train.dtype == held.dtype == np.int64
    assert len(held) == 50 and len(train) == 950
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    again_train, again_held = held_out_split(1000, 0.1, 50, seed=4)
    np.testing.assert_array_equal(again_held, held)
    assert not np.array_equal(held_out_split(1000, 0.1, 50, seed=5)[1], held)
    assert len(held_out_split(1000, 0.02, 10**6, seed=0)[1]) == 20
    assert len(held_out_split(1, 0.5, 10, seed=0)[0]) == 1  # at least one training row
    for bad in ((0, 0.1, 5), (10, 1.0, 5), (10, -0.1, 5), (10, 0.1, -1)):
        with pytest.raises(UsageError):
            held_out_split(*bad, seed=0)

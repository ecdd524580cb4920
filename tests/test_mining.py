"""Hard-negative mining against a float64 computation written out here, and table sampling.

The expected table ranks every bank row per query in float64, removes the
positive, takes ranks [skip, skip + pool) and then applies the filters to that
window, one query at a time: the rule mining.py documents, written plainly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twotower.atomic import TEMPORARY_GLOB
from twotower.errors import DataError
from twotower.miners.exact import ExactMiner
from twotower.training.negatives.mining import HardNegativeTable, mine_hard_negatives

SKIP, POOL = 2, 5
Data = tuple[np.ndarray, np.ndarray, np.ndarray]  # (bank, queries, positives)
# far above float32 rounding of these scores (~1e-6): no ranking or filter decision near it
CLEARANCE = 1e-4


def expected_mining(
    queries: np.ndarray,
    positives: np.ndarray,
    bank: np.ndarray,
    skip: int,
    pool: int,
    seen: np.ndarray | None = None,
    **filters: float,
) -> tuple[np.ndarray, dict[str, int]]:
    """(table ids (N, pool), report counts) by brute force in float64, one query at a time;
    seen (N, T): each query's context ids, set aside like the positive."""
    scores = queries.astype(np.float64) @ bank.astype(np.float64).T
    table = np.full((len(queries), pool), -1, dtype=np.int64)
    counts = dict.fromkeys(
        ("candidates", "dropped_absolute_margin", "dropped_relative_margin", "dropped_max_score"), 0
    )
    counts.update(dropped=0, positives_found=0, seen_removed=0, short_queries=0, negatives=0)
    extra = 0 if seen is None else seen.shape[1]
    for i, positive in enumerate(positives):
        ranking = [int(j) for j in np.argsort(-scores[i], kind="stable")]
        returned = ranking[: skip + pool + 1 + extra]  # what the miner is asked for
        counts["positives_found"] += positive in returned
        own = set() if seen is None else {int(j) for j in seen[i] if j >= 0 and j != positive}
        counts["seen_removed"] += len(own & set(returned))
        ranking = [j for j in returned if j != positive and j not in own]
        window = ranking[skip : skip + pool]
        counts["candidates"] += len(window)
        ceilings = {}
        if "absolute_margin" in filters:
            ceilings["dropped_absolute_margin"] = scores[i, positive] - filters["absolute_margin"]
        if "relative_margin" in filters:
            ceilings["dropped_relative_margin"] = scores[i, positive] * (
                1 - filters["relative_margin"]
            )
        if "max_score" in filters:
            ceilings["dropped_max_score"] = filters["max_score"]
        kept = []
        for candidate in window:
            failed = [name for name, ceiling in ceilings.items() if scores[i, candidate] > ceiling]
            for name in failed:
                counts[name] += 1
            counts["dropped"] += bool(failed)
            if not failed:
                kept.append(candidate)
        table[i, : len(kept)] = kept
        counts["short_queries"] += len(kept) < pool
        counts["negatives"] += len(kept)
    return table, counts


@pytest.fixture(scope="module")
def data() -> Data:
    """(bank (300, 16), queries (40, 16), positives (40,)): even queries' positive is their best
    row, odd ones' is ranked 4th to 11th, so some windows hold rows that beat the positive.
    """
    rng = np.random.default_rng(11)
    bank = rng.standard_normal((300, 16), dtype=np.float32)
    queries = rng.standard_normal((40, 16), dtype=np.float32)
    scores = queries.astype(np.float64) @ bank.T.astype(np.float64)
    ranks = np.where(np.arange(40) % 2 == 0, 0, rng.integers(3, 11, size=40))
    positives = np.argsort(-scores, axis=1)[np.arange(40), ranks]
    top = np.sort(scores, axis=1)[:, -20:]
    assert np.diff(top, axis=1).min() > CLEARANCE, "near-ties at the top: pick another seed"
    return bank, queries, positives


def mine(data: Data, **options: float) -> tuple[HardNegativeTable, dict[str, int]]:
    bank, queries, positives = data
    miner = ExactMiner()
    miner.build(bank)
    table, report = mine_hard_negatives(miner, queries, positives, bank, **options)
    return table, report.as_dict()


def test_window_without_the_positive(data: Data) -> None:
    bank, queries, positives = data
    table, report = mine(data, skip=SKIP, pool=POOL)
    expected, counts = expected_mining(queries, positives, bank, SKIP, POOL)

    np.testing.assert_array_equal(table.ids, expected)
    assert not np.any(table.ids == positives[:, None])
    assert report == {"queries": 40, "skip": SKIP, "pool": POOL, **counts}
    # positives ranked 9th or lower are outside the top skip + pool + 1 = 8 the miner returns
    assert 20 < report["positives_found"] < 40 and report["short_queries"] == 0


def test_small_bank_pads_with_minus_one(data: Data) -> None:
    bank, queries, positives = data
    small_bank = bank[:6]
    small_positives = positives % 6
    miner = ExactMiner()
    miner.build(small_bank)
    table, report = mine_hard_negatives(miner, queries, small_positives, small_bank, 1, 8)
    expected, counts = expected_mining(queries, small_positives, small_bank, 1, 8)

    np.testing.assert_array_equal(table.ids, expected)
    assert np.all(table.ids[:, 4:] == -1)  # 6 rows - the positive - 1 skipped = 4 negatives
    assert report.short_queries == 40 and report.negatives == 40 * 4
    assert report.as_dict() == {"queries": 40, "skip": 1, "pool": 8, **counts}


def window_scores(data: Data, skip: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores of each query's window candidates (N, pool), positive scores (N,)) in float64."""
    bank, queries, positives = data
    scores = queries.astype(np.float64) @ bank.T.astype(np.float64)
    window, _ = expected_mining(queries, positives, bank, skip, pool)
    return np.take_along_axis(scores, window, axis=1), scores[np.arange(len(queries)), positives]


def filter_settings(data: Data) -> dict[str, dict[str, float]]:
    """Per filter: a setting that drops part of the windows, and one that must not drop.

    Margins of 0 must keep every candidate ranked below its positive (the even
    queries, whose positive is their best row); a max_score just above the best
    window score must keep everything.
    """
    candidates, _ = window_scores(data, SKIP, POOL)
    return {
        "absolute_margin": {"drops": 1.0, "keeps": 0.0},
        "relative_margin": {"drops": 0.15, "keeps": 0.0},
        "max_score": {
            "drops": float(np.median(candidates)) + CLEARANCE / 2,
            "keeps": float(candidates.max()) + CLEARANCE / 2,
        },
    }


@pytest.mark.parametrize("name", ["absolute_margin", "relative_margin", "max_score"])
def test_each_filter_drops_what_it_must_and_nothing_else(data: Data, name: str) -> None:
    bank, queries, positives = data
    settings = filter_settings(data)[name]
    candidates, positive = window_scores(data, SKIP, POOL)
    ceiling = {
        "absolute_margin": lambda v: positive - v,
        "relative_margin": lambda v: positive * (1 - v),
        "max_score": lambda v: np.full_like(positive, v),
    }[name]

    for case, value in settings.items():
        # no candidate sits within float32 rounding of its ceiling
        assert np.abs(candidates - ceiling(value)[:, None]).min() > CLEARANCE / 4, (name, case)
        table, report = mine(data, skip=SKIP, pool=POOL, **{name: value})
        expected, counts = expected_mining(queries, positives, bank, SKIP, POOL, **{name: value})
        np.testing.assert_array_equal(table.ids, expected, err_msg=f"{name} {case}")
        assert report == {"queries": 40, "skip": SKIP, "pool": POOL, **counts}
        if case == "drops":
            assert 0 < report[f"dropped_{name}"] < report["candidates"]
            assert report["short_queries"] > 0
        elif name == "max_score":
            assert report["dropped"] == 0
        else:
            assert np.all(table.ids[::2] != -1)


def test_filters_together_and_in_chunks(data: Data) -> None:
    bank, queries, positives = data
    filters = {"absolute_margin": 0.5, "relative_margin": 0.1, "max_score": 6.0}
    expected, counts = expected_mining(queries, positives, bank, 3, 6, **filters)
    whole, whole_report = mine(data, skip=3, pool=6, **filters)
    chunked, chunked_report = mine(data, skip=3, pool=6, chunk_size=7, **filters)

    for table, report in ((whole, whole_report), (chunked, chunked_report)):
        np.testing.assert_array_equal(table.ids, expected)
        assert report == {"queries": 40, "skip": 3, "pool": 6, **counts}
    assert counts["dropped"] < (
        counts["dropped_absolute_margin"]
        + counts["dropped_relative_margin"]
        + counts["dropped_max_score"]
    ), "the filters should overlap here, to show a candidate counts once in `dropped`"


def test_bad_arguments_are_refused(data: Data) -> None:
    bank, queries, positives = data
    miner = ExactMiner()
    miner.build(bank)
    with pytest.raises(ValueError, match="positive_ids must lie"):
        mine_hard_negatives(miner, queries, positives + 300, bank, SKIP, POOL)
    with pytest.raises(ValueError, match="pool >= 1"):
        mine_hard_negatives(miner, queries, positives, bank, SKIP, 0)
    with pytest.raises(ValueError, match="relative_margin"):
        mine_hard_negatives(miner, queries, positives, bank, SKIP, POOL, relative_margin=1.5)


# 4 rows: 5 valid ids, 2 valid ids, none, 3 valid ids between -1s
TABLE = np.array(
    [
        [10, 11, 12, 13, 14],
        [20, 21, -1, -1, -1],
        [-1, -1, -1, -1, -1],
        [30, -1, 31, 32, -1],
    ]
)


def test_sample_draws_valid_ids_without_replacement() -> None:
    table = HardNegativeTable(TABLE)
    rows = np.array([0, 1, 2, 3, 0, 3])
    drawn = table.sample(rows, 3, np.random.default_rng(0))

    assert drawn.shape == (6, 3) and drawn.dtype == np.int64
    for row, ids in zip(rows, drawn, strict=True):
        valid = set(TABLE[row][TABLE[row] >= 0].tolist())
        taken = ids[ids >= 0].tolist()
        assert len(taken) == len(set(taken)) == min(3, len(valid)), (row, ids)
        assert set(taken) <= valid
        assert np.all(ids[len(taken) :] == -1)
    # k beyond the pool pads with -1
    wide = table.sample(np.array([0]), 7, np.random.default_rng(0))
    assert sorted(wide[0, :5].tolist()) == TABLE[0].tolist() and np.all(wide[0, 5:] == -1)


def test_sample_is_seeded_and_uniform() -> None:
    table = HardNegativeTable(TABLE)
    rows = np.array([0, 3, 1, 0])
    first = table.sample(rows, 2, np.random.default_rng(42))
    np.testing.assert_array_equal(first, table.sample(rows, 2, np.random.default_rng(42)))
    assert any(
        not np.array_equal(first, table.sample(rows, 2, np.random.default_rng(seed)))
        for seed in range(5)
    )
    # row 3's three valid ids are each drawn a third of the time, wherever they sit
    draws = table.sample(np.full(6000, 3), 1, np.random.default_rng(1))[:, 0]
    frequencies = np.array([np.mean(draws == i) for i in (30, 31, 32)])
    np.testing.assert_allclose(frequencies, 1 / 3, atol=0.03)


@pytest.mark.parametrize("pool", [0, 6])
def test_empty_table_samples_nothing(pool: int) -> None:
    table = HardNegativeTable.empty(50, pool)
    assert table.ids.shape == (50, pool) and table.pool == pool
    np.testing.assert_array_equal(
        table.sample(np.array([0, 49, 7]), 4, np.random.default_rng(0)), np.full((3, 4), -1)
    )


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "mined" / "hard-0000100.npy"
    path.parent.mkdir()
    HardNegativeTable(TABLE).save(path)
    loaded = HardNegativeTable.load(path)
    np.testing.assert_array_equal(loaded.ids, TABLE)
    assert loaded.ids.dtype == np.int64 and not list(path.parent.glob(TEMPORARY_GLOB))

    np.save(tmp_path / "floats.npy", TABLE.astype(np.float32))
    with pytest.raises(DataError, match="int64"):
        HardNegativeTable.load(tmp_path / "floats.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="mine again"):
        HardNegativeTable.load(tmp_path / "junk.npy")


def test_a_querys_own_context_items_are_not_spent_as_its_negatives(data: Data) -> None:
    """--exclude-context: context ids leave the ranking like the positive, and the window is
    counted after them, as the brute force here does; the positive inside its own context is
    still only the positive."""
    bank, queries, positives = data
    scores = queries.astype(np.float64) @ bank.T.astype(np.float64)
    ranked = np.argsort(-scores, axis=1)
    seen = np.full((len(queries), 4), -1, dtype=np.int64)
    seen[:, 0] = ranked[:, 1]  # a context item inside every window...
    seen[:, 1] = ranked[:, 3]
    seen[:, 2] = positives  # ...the positive in its own context...
    seen[::2, 3] = ranked[::2, 200]  # ...and one far below (never returned); -1 elsewhere
    miner = ExactMiner()
    miner.build(bank)
    table, report = mine_hard_negatives(miner, queries, positives, bank, SKIP, POOL, seen=seen)
    expected, counts = expected_mining(queries, positives, bank, SKIP, POOL, seen=seen)

    np.testing.assert_array_equal(table.ids, expected)
    own = seen[:, :2]
    assert not (table.ids[:, :, None] == own[:, None, :]).any()
    assert report.as_dict() == {"queries": 40, "skip": SKIP, "pool": POOL, **counts}
    assert report.seen_removed >= 40 and report.short_queries == 0
    plain, _ = mine_hard_negatives(miner, queries, positives, bank, SKIP, POOL)
    assert (plain.ids[:, :, None] == own[:, None, :]).any(), "the control: they would be mined"

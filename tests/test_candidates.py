"""The candidates of the loss (`twotower.batch.candidate_blocks`, what every engine scores):
masks written out by hand from docs/DESIGN.md's rules on a small batch, a rank's shard, the
score corrections, and the kept candidates of each query against the reference's own list,
with negative controls (without context ids, fewer entries are masked)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reference.loss import candidates_for, seen_ids
from tests.batches import make_batch
from twotower import Batch
from twotower.batch import candidate_blocks

T, F = True, False
BANK_ROWS = 10
LOG_FREQ = np.log(np.arange(1, BANK_ROWS + 1) / 55.0).astype(np.float32)  # made-up log(freq / N)


def hand_built(context_ids: bool = True) -> Batch:
    """B=3, K=2, Q=3, S=2 over a 10-row bank, D=2. Query 0 and 2 share positive 4; query 0
    has seen 7 (its hard negative), query 1 has seen 9 (a queue entry) and 5 (its own positive,
    never masked), query 2 has seen 3 (no candidate)."""
    bank = np.arange(2 * BANK_ROWS, dtype=np.float32).reshape(BANK_ROWS, 2)
    positives = np.array([4, 5, 4])
    hard = np.array([[4, 7], [-1, 8], [1, 2]])
    queue = np.array([-1, 5, 9])
    sampled = np.array([4, 6])
    return Batch(
        contexts=np.zeros((3, 2, 2), np.float32),
        lengths=np.array([1, 2, 1]),
        positive_ids=positives,
        positive_vecs=bank[positives],
        hard_ids=hard,
        hard_vecs=bank[hard],
        queue_ids=queue,
        queue_vecs=bank[queue],
        context_ids=np.array([[7, -1], [9, 5], [3, -1]]) if context_ids else None,
        bank=bank,
        sampled_ids=sampled,
        sampled_vecs=bank[sampled],
        in_batch_logq=LOG_FREQ[positives],
        queue_logq=LOG_FREQ[np.maximum(queue, 0)],
    )


# docs/DESIGN.md's rules applied by hand to `hand_built`, query by query
EXPECTED = {
    "in_batch": [[F, F, T], [F, F, F], [T, F, F]],  # the shared positive 4; own column kept
    "hard": [[T, T], [T, F], [F, F]],  # 4 = p_0, 7 seen by query 0; an empty slot
    "queue": [[T, F, F], [T, T, T], [T, F, F]],  # -1; 5 = p_1; 9 seen by query 1
    "sampled": [[T, F], [F, F], [T, F]],  # 4 = p_0 = p_2
}


def test_the_blocks_come_in_the_designs_order_with_the_masks_its_rules_give() -> None:
    blocks = candidate_blocks(hand_built())
    assert [block.name for block in blocks] == list(EXPECTED)
    for block in blocks:
        assert block.masked.tolist() == EXPECTED[block.name], block.name
    assert sum(int(block.masked.sum()) for block in blocks) == 12


def test_without_context_ids_the_seen_candidates_count_again() -> None:
    """Negative control: the same batch without seen-item masking masks two entries fewer
    (query 0's hard 7, query 1's queue 9)."""
    blocks = {block.name: block.masked for block in candidate_blocks(hand_built(False))}
    assert not blocks["hard"][0, 1] and not blocks["queue"][1, 2]
    assert sum(int(masked.sum()) for masked in blocks.values()) == 10


def test_a_ranks_shard_sees_its_rows_of_the_global_masks() -> None:
    """Queries 1 and 2 of the global batch as one rank holds them: the rows of the global
    masks, their own positives (columns 1 and 2) kept."""
    batch = hand_built()
    assert batch.context_ids is not None
    shard = dataclasses.replace(
        batch,
        contexts=batch.contexts[1:],
        lengths=batch.lengths[1:],
        hard_ids=batch.hard_ids[1:],
        hard_vecs=batch.hard_vecs[1:],
        context_ids=batch.context_ids[1:],
    )
    for block in candidate_blocks(shard, first_row=1):
        assert block.masked.tolist() == EXPECTED[block.name][1:], block.name


def test_the_corrections_are_logq_and_the_sampled_share_of_the_bank() -> None:
    corrections = {block.name: block.correction for block in candidate_blocks(hand_built())}
    np.testing.assert_array_equal(corrections["in_batch"], -LOG_FREQ[[4, 5, 4]])
    assert corrections["hard"] is None
    np.testing.assert_array_equal(corrections["queue"], -LOG_FREQ[[0, 5, 9]])
    np.testing.assert_allclose(corrections["sampled"], [np.log(5.0)] * 2, rtol=1e-15)
    plain = dataclasses.replace(hand_built(), in_batch_logq=None, queue_logq=None)
    assert all(block.correction is None for block in candidate_blocks(plain)[:3])


@pytest.mark.parametrize("seen", [False, True], ids=["plain", "seen-item-masking"])
def test_each_query_keeps_the_candidates_the_reference_keeps(seen: bool) -> None:
    """Per query, the (id, correction) pairs left unmasked equal those of the reference's
    own candidate list (reference/loss.py, which does not use the blocks) after its mask, and
    seen-item masking drops some (a negative control of the comparison's reach)."""
    batch = make_batch(np.random.default_rng(5), context_ids=seen, sampled=6, logq=True)
    blocks = candidate_blocks(batch)
    for i in range(len(batch.contexts)):
        kept = []
        for block in blocks:
            ids = block.ids[i] if block.per_query else block.ids
            correction = np.zeros(block.size) if block.correction is None else block.correction
            rows = zip(ids, correction, block.masked[i], strict=True)
            kept += [(int(c), round(float(x), 5)) for c, x, m in rows if not m]
        _, ids, corrections = candidates_for(batch, i)
        keep = (ids != ids[0]) & (ids != -1) & ~np.isin(ids, seen_ids(batch, i))
        keep[0] = True
        rows = zip(ids[keep], corrections[keep], strict=True)
        expected = [(int(c), round(float(x), 5)) for c, x in rows]  # float32 logQ: 5 places
        assert sorted(kept) == sorted(expected), i
    if seen:
        clean = candidate_blocks(dataclasses.replace(batch, context_ids=None))
        assert sum(b.masked.sum() for b in blocks) > sum(b.masked.sum() for b in clean)

"""MemoryQueue: FIFO order against collections.deque, wrap-around, B > Q, Q = 0,
state round trip, and the loss masking of empty and positive-id slots (float64 reference)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
import pytest

import reference
from twotower.batch import Batch
from twotower.errors import UsageError
from twotower.towers import TowerSpec, init_params
from twotower.training.negatives.queue import MemoryQueue

DIM = 4


def vec_of(ids: np.ndarray) -> np.ndarray:
    """A vector that identifies its id, so a test can tell which entry sits in a slot."""
    ids = np.asarray(ids, dtype=np.float32)
    return ids[:, None] + np.arange(DIM, dtype=np.float32) / 10  # (B, DIM)


def oldest_first(queue: MemoryQueue) -> list[int]:
    """The queue's filled ids read from head round the ring: oldest first."""
    ring = np.roll(queue.ids, -queue.head)
    return [int(i) for i in ring if i != -1]


@pytest.mark.parametrize(
    ("size", "batch"),
    [(8, 3), (7, 2), (6, 6), (6, 1), (5, 7), (3, 8)],
    ids=["Q8B3", "Q7B2", "Q6B6", "Q6B1", "Q5B7", "Q3B8"],
)
def test_push_matches_a_bounded_deque(size: int, batch: int) -> None:
    queue = MemoryQueue(size, DIM)
    model: deque[int] = deque(maxlen=size)
    ids_array, vecs_array = queue.ids, queue.vecs
    for push in range(9):
        ids = np.arange(push * batch, (push + 1) * batch, dtype=np.int64) + 100
        queue.push(ids, vec_of(ids))
        model.extend(int(i) for i in ids)

        filled = queue.ids != -1
        assert sorted(queue.ids[filled]) == sorted(model)  # the survivors are the newest Q
        assert oldest_first(queue) == list(model)  # and head marks the oldest
        np.testing.assert_array_equal(queue.vecs[filled], vec_of(queue.ids[filled]))
        np.testing.assert_array_equal(queue.vecs[~filled], 0.0)
    assert queue.ids is ids_array and queue.vecs is vecs_array  # written in place


def test_oldest_slot_is_overwritten_first() -> None:
    queue = MemoryQueue(5, DIM)
    queue.push(np.arange(5), vec_of(np.arange(5)))
    queue.push(np.array([50, 51]), vec_of(np.array([50, 51])))
    np.testing.assert_array_equal(queue.ids, [50, 51, 2, 3, 4])
    queue.push(np.array([60, 61, 62, 63]), vec_of(np.array([60, 61, 62, 63])))
    np.testing.assert_array_equal(queue.ids, [63, 51, 60, 61, 62])


def test_zero_size_queue_holds_nothing() -> None:
    queue = MemoryQueue(0, DIM)
    queue.push(np.arange(3), vec_of(np.arange(3)))
    assert queue.ids.shape == (0,) and queue.vecs.shape == (0, DIM)
    state = queue.state()
    assert state["queue.ids"].shape == (0,) and int(state["queue.head"]) == 0
    MemoryQueue(0, DIM).load_state(state)


def test_push_rejects_mismatched_shapes() -> None:
    queue = MemoryQueue(4, DIM)
    with pytest.raises(ValueError, match="push takes"):
        queue.push(np.arange(3), np.zeros((3, DIM + 1)))
    with pytest.raises(ValueError, match="push takes"):
        queue.push(np.arange(3), np.zeros((2, DIM)))


def test_state_round_trip_continues_identically() -> None:
    queue = MemoryQueue(7, DIM)
    for start in (0, 3, 6):
        ids = np.arange(start, start + 3)
        queue.push(ids, vec_of(ids))
    state = queue.state()
    restored = MemoryQueue(7, DIM)
    ids_array = restored.ids
    restored.load_state(state)
    assert restored.ids is ids_array  # a Batch holding the arrays sees the restored values
    state["queue.ids"][:] = -5  # state() handed out copies
    assert (queue.ids != -5).all()

    ids = np.array([40, 41, 42])
    queue.push(ids, vec_of(ids))
    restored.push(ids, vec_of(ids))
    np.testing.assert_array_equal(restored.ids, queue.ids)
    np.testing.assert_array_equal(restored.vecs, queue.vecs)
    assert restored.head == queue.head


@pytest.mark.parametrize(
    ("size", "dim", "message"),
    [(5, DIM, "--queue-size"), (7, DIM + 1, "--queue-size")],
    ids=["other-size", "other-dim"],
)
def test_load_state_rejects_another_shape(size: int, dim: int, message: str) -> None:
    state = MemoryQueue(7, DIM).state()
    with pytest.raises(UsageError, match=message) as raised:
        MemoryQueue(size, dim).load_state(state)
    assert "\n" not in str(raised.value)


def test_load_state_rejects_missing_keys_and_bad_head() -> None:
    state = MemoryQueue(4, DIM).state()
    with pytest.raises(UsageError, match="queue.head"):
        MemoryQueue(4, DIM).load_state({k: v for k, v in state.items() if k != "queue.head"})
    with pytest.raises(UsageError, match="head 4"):
        MemoryQueue(4, DIM).load_state({**state, "queue.head": np.array(4)})


# --- masking, through the float64 reference --------------------------------------

# A mild temperature gives every candidate real weight in the softmax; at 0.05 a random
# negative can carry e^-20 of it, too faint for a negative control to see.
TAU = 1.0
SPEC = TowerSpec(kind="gru", dim=6, hidden=5, layers=1)


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, SPEC.dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def masking_case() -> tuple[dict[str, np.ndarray], Batch, np.ndarray]:
    """Three queries with positives 3, 7, 9 and a queue of 6 slots: [5, 3, 12, 20, -1, -1].

    Slot 1 holds query 0's own positive; slots 4 and 5 were never written.
    Returns (params, batch, bank).
    """
    rng = np.random.default_rng(7)
    bank = unit_rows(rng, 30)  # (M, D)
    positives = np.array([3, 7, 9])
    queue = MemoryQueue(6, SPEC.dim)
    queued = np.array([5, 3, 12, 20])
    queue.push(queued, bank[queued])
    contexts = rng.normal(size=(3, 4, SPEC.dim)).astype(np.float32)
    batch = Batch.in_batch_only(contexts, np.array([4, 2, 3]), positives, bank[positives])
    batch = replace(batch, queue_ids=queue.ids, queue_vecs=queue.vecs)
    return init_params(SPEC, seed=1), batch, bank


def loss_by_hand(q: np.ndarray, batch: Batch, queue_slots: list[list[int]]) -> float:
    """InfoNCE as docs/DESIGN.md writes it, with query i's queue candidates listed explicitly."""
    total = 0.0
    for i in range(len(q)):
        others = [j for j in range(len(q)) if j != i]
        candidates = np.concatenate(
            [batch.positive_vecs[[i] + others], batch.queue_vecs[queue_slots[i]]]
        ).astype(np.float64)
        scores = candidates @ q[i] / TAU
        total += np.log(np.exp(scores - scores.max()).sum()) + scores.max() - scores[0]
    return total / len(q)


def test_empty_slots_change_nothing(masking_case) -> None:
    params, batch, bank = masking_case
    # Give the empty slots real vectors, so only their id -1 can keep them out of the loss.
    stale = replace(batch, queue_vecs=np.concatenate([batch.queue_vecs[:4], bank[[25, 26]]]))
    loss, grads = reference.loss_and_grads("gru", params, stale, TAU)
    removed = replace(batch, queue_ids=batch.queue_ids[:4], queue_vecs=batch.queue_vecs[:4])
    removed_loss, removed_grads = reference.loss_and_grads("gru", params, removed, TAU)
    assert loss == pytest.approx(removed_loss, rel=1e-12)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, removed_grads[name], rtol=1e-10, atol=1e-14)

    # Negative control: the same vectors under real ids are negatives and move the loss.
    real = replace(stale, queue_ids=np.array([5, 3, 12, 20, 25, 26]))
    real_loss, _ = reference.loss_and_grads("gru", params, real, TAU)
    assert abs(real_loss - loss) > 1e-3


def test_positive_id_slot_is_masked_for_its_query_only(masking_case) -> None:
    params, batch, _ = masking_case
    loss, _ = reference.loss_and_grads("gru", params, batch, TAU)
    q = reference.encode("gru", params, batch.contexts, batch.lengths)
    # Slot 1 (id 3) is query 0's positive: gone for query 0, a real negative for queries 1, 2.
    expected = loss_by_hand(q, batch, [[0, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    assert loss == pytest.approx(expected, rel=1e-12)

    # Negative control: under another id the slot counts for query 0 as well.
    renamed = replace(batch, queue_ids=np.array([5, 21, 12, 20, -1, -1]))
    renamed_loss, _ = reference.loss_and_grads("gru", params, renamed, TAU)
    assert renamed_loss == pytest.approx(loss_by_hand(q, batch, [[0, 1, 2, 3]] * 3), rel=1e-12)
    assert abs(renamed_loss - loss) > 1e-3

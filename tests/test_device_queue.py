"""The queue ring on the backend's device: kept slot for slot equal to the NumPy ring through
pushes (wrapping, batches larger than the ring) and restores; steps that read it compute what
steps that are sent the ring compute, bit for bit; and it is what they read (negative control)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.batches import make_batch
from twotower import backends
from twotower.batch import seen_by_query
from twotower.training.negatives.queue import MemoryQueue

pytestmark = pytest.mark.skipif("torch-cpu" not in backends.available(), reason="needs torch")


def torch_cpu(**opts):
    return backends.get("torch-cpu", tower="gru", dim=12, hidden=8, seed=3, **opts)


def assert_mirrors(queue: MemoryQueue, backend) -> None:
    np.testing.assert_array_equal(backend.queue.ids.cpu().numpy(), queue.ids)
    np.testing.assert_array_equal(backend.queue.vecs.cpu().numpy(), queue.vecs)


def test_the_device_ring_follows_every_push_and_restore() -> None:
    rng = np.random.default_rng(0)
    queue = MemoryQueue(7, 12)
    backend = torch_cpu(mirror_queue=True)
    queue.attach(backend.queue_mirror(queue.ids, queue.vecs))
    for count in (3, 3, 5, 9, 1, 7):  # wraps, a push larger than the ring, exactly the ring
        queue.push(rng.integers(0, 40, count), rng.standard_normal((count, 12)).astype(np.float32))
        assert_mirrors(queue, backend)
    saved = queue.state()
    queue.push(np.arange(4), np.ones((4, 12), np.float32))
    queue.load_state(saved)
    assert_mirrors(queue, backend)


def test_cpu_keeps_no_copy_by_default() -> None:
    assert torch_cpu().queue_mirror(np.zeros(3, np.int64), np.zeros((3, 12), np.float32)) is None


@pytest.mark.parametrize("seen", [False, True], ids=["plain", "seen-item-masking"])
def test_steps_on_the_device_ring_equal_steps_sent_the_ring(seen: bool) -> None:
    rng = np.random.default_rng(1)
    mirrored, sent = torch_cpu(mirror_queue=True), torch_cpu()
    queues = [MemoryQueue(7, 12), MemoryQueue(7, 12)]
    queues[0].attach(mirrored.queue_mirror(queues[0].ids, queues[0].vecs))
    masked_seen = 0
    for _ in range(5):
        batch = make_batch(rng, context_ids=seen)  # its own queue is replaced by the ring
        for backend, queue in zip((mirrored, sent), queues, strict=True):
            with_queue = dataclasses.replace(batch, queue_ids=queue.ids, queue_vecs=queue.vecs)
            backend.step(with_queue)
            queue.push(batch.positive_ids, batch.positive_vecs)
            masked_seen += (
                int(np.sum(seen_by_query(batch.context_ids, with_queue.queue_ids[None, :])))
                if seen
                else 0
            )
    assert (queues[0].ids >= 0).all()  # the ring was full and in use
    assert masked_seen > 0 or not seen  # seen-item masking hid queue entries
    for name, value in sent.state().items():
        np.testing.assert_array_equal(mirrored.state()[name], value, err_msg=name)


def test_the_step_reads_the_device_ring() -> None:
    """Negative control: a device ring that differs from the host's changes the loss."""
    rng = np.random.default_rng(2)
    backend = torch_cpu(mirror_queue=True)
    queue = MemoryQueue(7, 12)
    queue.attach(backend.queue_mirror(queue.ids, queue.vecs))
    batch = make_batch(rng, queue=0)
    queue.push(rng.integers(0, 40, 7), rng.standard_normal((7, 12)).astype(np.float32))
    with_queue = dataclasses.replace(batch, queue_ids=queue.ids, queue_vecs=queue.vecs)
    loss, _ = backend.loss_and_grads(with_queue)
    backend.queue.vecs.mul_(-1.0)
    changed, _ = backend.loss_and_grads(with_queue)
    assert changed != loss
    copy = dataclasses.replace(with_queue, queue_vecs=queue.vecs.copy())  # not the ring: sent
    assert backend.loss_and_grads(copy)[0] == loss

"""The FIFO memory bank of negatives: a ring of Q (vector, id) pairs.

After each step the trainer pushes the batch's positives; the oldest entries
are overwritten first, whatever Q mod B is. `ids` and `vecs` are preallocated
once and only ever written in place, so a `Batch` can hold them as its
`queue_ids` / `queue_vecs` without a copy per step. The ring is part of
checkpoint state under the names in `STATE_KEYS`.

A backend that keeps its own copy of the ring (on an accelerator) is
`attach`ed as a mirror: every push and restore is copied to it, slot for slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from twotower.errors import UsageError

IDS_KEY = "queue.ids"
VECS_KEY = "queue.vecs"
HEAD_KEY = "queue.head"
STATE_KEYS = (IDS_KEY, VECS_KEY, HEAD_KEY)
EMPTY_ID = -1


class QueueMirror(Protocol):
    """A copy of the ring elsewhere (a device): kept equal to it by the queue."""

    def load(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Copy the whole ring: ids (Q,), vecs (Q, D)."""

    def write(self, start: int, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Copy ids (n,) and vecs (n, D) into slots [start, start + n)."""


class MemoryQueue:
    """A ring of `size` (vector, id) pairs of dimension `dim`; size 0 is a queue that holds nothing.

    ids: (Q,) int64, -1 in slots never written; vecs: (Q, D) float32 (zeros there);
    head: the slot the next pushed entry goes to, which is also the oldest entry
    once the ring is full. Reading the ring from `head` round to `head - 1`
    gives the entries oldest first (empty slots, if any, come first).
    """

    def __init__(self, size: int, dim: int):
        if size < 0:
            raise UsageError(f"--queue-size must be >= 0, got {size}")
        if dim < 1:
            raise UsageError(f"queue vector dim must be >= 1, got {dim}")
        self.size = size
        self.dim = dim
        self.ids = np.full(size, EMPTY_ID, dtype=np.int64)  # (Q,)
        self.vecs = np.zeros((size, dim), dtype=np.float32)  # (Q, D)
        self.head = 0
        self.mirror: QueueMirror | None = None

    def attach(self, mirror: QueueMirror | None) -> None:
        """Keep `mirror` equal to the ring from now on (it gets the whole ring now)."""
        self.mirror = mirror
        if mirror is not None:
            mirror.load(self.ids, self.vecs)

    def push(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Enqueue ids (B,) int and vecs (B, D), in order, overwriting the oldest entries.

        B may exceed Q (only the newest Q survive). Writes into the existing
        arrays: at most two slice copies, no allocation. Raises ValueError on
        shapes that disagree with each other or with the queue's dim.
        """
        count = len(ids)
        if np.ndim(ids) != 1 or np.shape(vecs) != (count, self.dim):
            raise ValueError(
                f"push takes ids (B,) and vecs (B, {self.dim}), "
                f"got {np.shape(ids)} and {np.shape(vecs)}"
            )
        if self.size == 0:
            return
        kept = min(count, self.size)
        # Entry k of the push goes to slot (head + k) % Q, exactly as if pushed
        # one at a time; the first count - kept entries would be overwritten anyway.
        start = (self.head + count - kept) % self.size
        first = min(kept, self.size - start)
        source = slice(count - kept, count - kept + first)
        self.ids[start : start + first] = ids[source]
        self.vecs[start : start + first] = vecs[source]
        self.ids[: kept - first] = ids[count - kept + first :]
        self.vecs[: kept - first] = vecs[count - kept + first :]
        self.head = (self.head + count) % self.size
        if self.mirror is not None:
            self.mirror.write(
                start, self.ids[start : start + first], self.vecs[start : start + first]
            )
            if kept > first:
                self.mirror.write(0, self.ids[: kept - first], self.vecs[: kept - first])

    def state(self) -> dict[str, np.ndarray]:
        """Fresh copies: `queue.ids` (Q,) int64, `queue.vecs` (Q, D) float32, `queue.head` ()."""
        return {
            IDS_KEY: self.ids.copy(),
            VECS_KEY: self.vecs.copy(),
            HEAD_KEY: np.array(self.head, dtype=np.int64),
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from a `state()` (other keys are ignored), copying into the existing arrays.

        Raises UsageError when a key is missing or the shapes differ from this
        queue's (a checkpoint written with another --queue-size or dim).
        """
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise UsageError(
                f"checkpoint has no queue state ({', '.join(missing)} missing); "
                "it was not written by this trainer"
            )
        ids = np.asarray(state[IDS_KEY])
        vecs = np.asarray(state[VECS_KEY])
        head = int(np.asarray(state[HEAD_KEY]))
        if ids.shape != (self.size,) or vecs.shape != (self.size, self.dim):
            raise UsageError(
                f"checkpoint queue holds ids {ids.shape} and vecs {vecs.shape}, this run needs "
                f"({self.size},) and ({self.size}, {self.dim}); resume with the --queue-size "
                "and data the checkpoint was written with, or start a new run"
            )
        if not 0 <= head < max(self.size, 1):
            raise UsageError(f"checkpoint queue head {head} is outside [0, {self.size})")
        self.ids[:] = ids
        self.vecs[:] = vecs
        self.head = head
        if self.mirror is not None:
            self.mirror.load(self.ids, self.vecs)

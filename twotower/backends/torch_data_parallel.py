"""The torch engine's side of data-parallel training: one rank's shard, gradients summed over ranks.

Under torchrun each rank computes the loss of its b = B / W queries against
the global batch's B positives as sum_i loss_i / B (its share of the global
mean), so the sum over ranks of every rank's gradient is the gradient of the
1-process loss. `GradientSum` adds them up with one all-reduce over a flat
buffer of every gradient (the default process group, set up by
`twotower.training.ranks.distributed`), the loss riding in the same buffer. Every
rank then clips and steps on identical numbers, so parameters and optimizer
moments stay identical without ever being broadcast.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from twotower.process.collective_ledger import CollectiveLedger, counted


class GradientSum:
    """Sums gradients and loss over the ranks of the default process group.

    rank, world: this process's rank and the number of ranks; ledger: where the
    rank counts its collectives (`twotower.process.collective_ledger`). `seconds` adds up
    the wall time spent in the collective (for the benchmark and the step log).
    """

    def __init__(self, rank: int, world: int, ledger: CollectiveLedger | None = None):
        self.rank = rank
        self.world = world
        self.ledger = ledger
        self.seconds = 0.0

    def first_row(self, local_rows: int) -> int:
        """The global batch row of this rank's first query, for shards of `local_rows` rows."""
        return self.rank * local_rows

    def take_seconds(self) -> float:
        """Seconds spent in all-reduces since the last call (and reset the count)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def reduce(self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Replace each parameter's .grad with its sum over ranks; return the summed loss.

        A parameter without a gradient counts as zeros, so every rank reduces buffers of
        the same size.
        """
        started = time.perf_counter()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        with counted(self.ledger, "gradients"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        self.seconds += time.perf_counter() - started
        return float(flat[-1])

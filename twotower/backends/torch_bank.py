"""The frozen bank for the torch engines: where it lies on the device, and InfoNCE over all
of it (`--bank-negatives full`) as an autograd function.

`DeviceBank` holds the (M, D) bank as one tensor: on the CPU a view of the NumPy array (of
the memory map: nothing is read or copied until a chunk is used); on MPS or CUDA a copy
made once, chunk by chunk, so the host never holds a second copy and no step sends the
bank again. `FullSoftmax` computes the loss and dL/dq in one pass over bank chunks (the
running logsumexp of `reference/bank.py`), keeps only dL/dq (b, D) for the backward, and
never holds more than b x chunk scores: autograd over the chunks would keep them all.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from twotower.backends.bank_softmax import chunk_rows


class DeviceBank:
    """The bank (M, D) float32 on `device`; `host` is the array it was made from (a Batch
    whose `bank` is that array is served from here)."""

    def __init__(self, host: np.ndarray, device: torch.device):
        if host.dtype != np.float32 or not host.flags.c_contiguous:
            raise ValueError("the bank must be a C-contiguous float32 array (as datasets map it)")
        self.host = host
        with warnings.catch_warnings():  # a read-only map: torch warns, and never writes it
            warnings.simplefilter("ignore", UserWarning)
            view = torch.from_numpy(np.asarray(host))
        if device.type == "cpu":
            self.rows = view
            return
        self.rows = torch.empty(view.shape, dtype=torch.float32, device=device)
        step = chunk_rows(host.shape[1])
        for start in range(0, len(view), step):  # one chunk of the map in host memory at a time
            self.rows[start : start + step].copy_(view[start : start + step])

    def chunks(self) -> tuple[torch.Tensor, ...]:
        """The bank as consecutive (n, D) views of `chunk_rows` rows."""
        return torch.split(self.rows, chunk_rows(self.rows.shape[1]))


class FullSoftmax(torch.autograd.Function):
    """sum_i loss_i / divisor over every bank row; the gradient goes to q only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        bank: DeviceBank,
        positive_ids: torch.Tensor,
        seen: tuple[torch.Tensor, torch.Tensor],
        temperature: float,
        divisor: int,
    ) -> torch.Tensor:
        """q (b, D), positive_ids (b,), seen (query index (n,), bank id (n,)) masked."""
        q = q.detach()
        positives = bank.rows[positive_ids]  # (b, D)
        target = (q * positives).sum(dim=1) / temperature  # s_i,p_i
        top = target.clone()  # running max, started at a score that always counts
        total = torch.zeros_like(target)  # running sum of exp(s - top)
        weighted = torch.zeros_like(q)  # running sum of exp(s - top) bank_j
        queries, ids = seen
        start = 0
        for rows in bank.chunks():
            scores = q @ rows.T / temperature  # (b, n)
            inside = (ids >= start) & (ids < start + len(rows))
            scores[queries[inside], ids[inside] - start] = float("-inf")
            new_top = torch.maximum(top, scores.max(dim=1).values)
            rescale = torch.exp(top - new_top)
            weights = torch.exp(scores - new_top[:, None])
            total = total * rescale + weights.sum(dim=1)
            weighted = weighted * rescale[:, None] + weights @ rows
            top = new_top
            start += len(rows)
        ctx.save_for_backward((weighted / total[:, None] - positives) / (temperature * divisor))
        return (top + torch.log(total) - target).sum() / divisor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (dq,) = ctx.saved_tensors
        return grad * dq, None, None, None, None, None

"""The torch engines (`torch-cpu`, `torch-mps`, `torch-cuda`): one class, parameterised by device.

The tower is `nn.GRU` + `nn.Linear` (so a user's state dict loads as is),
gradients come from autograd, the update from `clip_grad_norm_` and
`torch.optim.AdamW`. Two GRU paths compute the same numbers:

- "packed": `pack_padded_sequence` + cuDNN/oneDNN `nn.GRU` (the default on CPU and CUDA);
- "masked": an explicit time loop whose update is skipped past each length
  (the default on MPS, where packed sequences have known bugs).

On an accelerator (MPS, CUDA) the memory-bank queue lives on the device too
(`DeviceQueue`, made by `queue_mirror` and kept current by the trainer's
MemoryQueue), so a step sends only the batch's own vectors, not Q x D. On the
CPU, torch reads the NumPy ring in place, so nothing is mirrored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from twotower.backends.base import StepSettings, join_state, split_state
from twotower.backends.torch_bank import DeviceBank, FullSoftmax
from twotower.backends.torch_data_parallel import GradientSum
from twotower.batch import (
    Batch,
    CandidateBlock,
    StepStats,
    candidate_blocks,
    full_bank_seen,
    own_positive_ids,
)
from twotower.process.collective_ledger import CollectiveLedger
from twotower.towers import TowerSpec

GRU_PATHS = ("packed", "masked")


class QueryTower(nn.Module):
    """The tower as torch modules, named so its state_dict keys are twotower's."""

    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.spec = spec
        if spec.kind == "gru":
            self.gru = nn.GRU(spec.dim, spec.hidden, spec.layers, batch_first=True)
            self.proj = nn.Linear(spec.hidden, spec.dim)
        elif spec.proj:
            self.proj = nn.Linear(spec.dim, spec.dim)

    def features(self, x: torch.Tensor, lengths: torch.Tensor, gru_path: str) -> torch.Tensor:
        """x (B, T, D), lengths (B,) on the CPU -> pooled features (B, H or D)."""
        active = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        if self.spec.kind == "meanpool":
            summed = torch.where(active[:, :, None], x, 0.0).sum(dim=1)
            return summed / lengths.to(x.device, x.dtype)[:, None]
        if gru_path == "packed":
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, h_n = self.gru(packed)  # (L, B, H), back in the batch's order
            return h_n[-1]
        return self._masked_gru(torch.where(active[:, :, None], x, 0.0), active)

    def _masked_gru(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        hidden = self.spec.hidden
        for layer in range(self.spec.layers):
            w_ih = getattr(self.gru, f"weight_ih_l{layer}")
            w_hh = getattr(self.gru, f"weight_hh_l{layer}")
            b_hh = getattr(self.gru, f"bias_hh_l{layer}")
            gi = x @ w_ih.T + getattr(self.gru, f"bias_ih_l{layer}")  # (B, T, 3H)
            h = x.new_zeros(x.shape[0], hidden)
            outputs = []
            for t in range(x.shape[1]):
                gh = h @ w_hh.T + b_hh
                r, z = torch.sigmoid(gi[:, t, : 2 * hidden] + gh[:, : 2 * hidden]).chunk(2, dim=1)
                n = torch.tanh(gi[:, t, 2 * hidden :] + r * gh[:, 2 * hidden :])
                h = torch.where(active[:, t, None], n + z * (h - n), h)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
        return h

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, gru_path: str) -> torch.Tensor:
        """-> unit query vectors (B, D)."""
        y = self.features(x, lengths, gru_path)
        if hasattr(self, "proj"):
            y = self.proj(y)
        if self.spec.residual == "last":
            rows = torch.arange(x.shape[0], device=x.device)
            y = y + x[rows, lengths.to(x.device) - 1]
        return F.normalize(y, dim=1, eps=1e-12)


class DeviceQueue:
    """A copy of the memory-bank ring on the backend's device: ids (Q,) int64, vecs (Q, D).

    host_vecs: the NumPy ring it mirrors (a Batch whose queue_vecs is that array
    is served from here). The owner calls `write` after each push and `load`
    after a restore, so the copy never differs from the ring.
    """

    def __init__(self, host_ids: np.ndarray, host_vecs: np.ndarray, device: torch.device):
        self.host_vecs = host_vecs
        self.ids = torch.empty(host_ids.shape, dtype=torch.int64, device=device)
        self.vecs = torch.empty(host_vecs.shape, dtype=torch.float32, device=device)
        self.load(host_ids, host_vecs)

    def load(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Copy the whole ring: ids (Q,), vecs (Q, D)."""
        self.ids.copy_(torch.from_numpy(np.ascontiguousarray(ids)))
        self.vecs.copy_(torch.from_numpy(np.ascontiguousarray(vecs)))

    def write(self, start: int, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Copy ids (n,) and vecs (n, D) into slots [start, start + n)."""
        stop = start + len(ids)
        self.ids[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(ids)))
        self.vecs[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(vecs)))


def infonce(
    q: torch.Tensor,
    batch: Batch,
    temperature: float,
    queue: DeviceQueue | None = None,
    first_row: int = 0,
    bank: DeviceBank | None = None,
) -> torch.Tensor:
    """Masked InfoNCE of docs/DESIGN.md for queries q (b, D) over the batch's
    `candidate_blocks`; the positive of query i is in-batch column first_row + i. b = B: the
    batch's mean loss. b < B (one rank's shard of the global batch): sum_i loss_i / B, its
    share of the global mean.

    queue: the ring on the device, used when it mirrors batch.queue_vecs (else it is sent).
    bank: batch.bank on the device (the full softmax reads it; sampled rows come from it).
    """
    device = q.device
    if batch.full_softmax:
        assert bank is not None, "the full softmax needs the bank"
        positive_ids = torch.as_tensor(own_positive_ids(batch, first_row), device=device)
        queries, ids = full_bank_seen(batch, first_row)
        seen = (torch.as_tensor(queries, device=device), torch.as_tensor(ids, device=device))
        divisor = len(batch.positive_ids)
        return FullSoftmax.apply(q, bank, positive_ids, seen, temperature, divisor)
    blocks = candidate_blocks(batch, first_row)
    scores = [_block_scores(q, block, temperature, queue, bank) for block in blocks]
    logits = torch.cat(scores, dim=1) / temperature
    masked = np.concatenate([block.masked for block in blocks], axis=1)
    logits = logits.masked_fill(torch.as_tensor(masked, device=device), float("-inf"))
    targets = torch.arange(q.shape[0], device=device) + first_row
    if q.shape[0] == len(batch.positive_ids):
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="sum") / len(batch.positive_ids)


def _block_scores(
    q: torch.Tensor,
    block: CandidateBlock,
    temperature: float,
    queue: DeviceQueue | None,
    bank: DeviceBank | None,
) -> torch.Tensor:
    """q (b, D) . the block's candidates, plus temperature * its correction -> (b, n): the
    block's logits before the division by the temperature."""
    device = q.device
    if queue is not None and block.vectors is queue.host_vecs:
        vectors = queue.vecs  # the ring, already on the device
    elif block.name == "sampled" and bank is not None:
        vectors = bank.rows[torch.as_tensor(block.ids, device=bank.rows.device)].to(device)
    else:
        vectors = torch.as_tensor(block.vectors, device=device)
    scores = torch.bmm(vectors, q[:, :, None])[:, :, 0] if block.per_query else q @ vectors.T
    if block.correction is None:
        return scores
    correction = torch.as_tensor(temperature * block.correction, dtype=scores.dtype)
    return scores + correction.to(device)


class TorchBackend:
    """A torch engine on one device. See `twotower.backends.base.Backend` for the protocol."""

    def __init__(
        self,
        spec: TowerSpec,
        settings: StepSettings,
        params: Mapping[str, np.ndarray],
        device: str = "cpu",
        gru_path: str | None = None,
        deterministic: bool = False,
        mirror_queue: bool | None = None,
    ):
        if gru_path is None:
            gru_path = "masked" if device == "mps" else "packed"
        if gru_path not in GRU_PATHS:
            raise ValueError(f"gru_path must be one of {GRU_PATHS}, got {gru_path!r}")
        if deterministic:
            torch.use_deterministic_algorithms(True)
        self.name = f"torch-{device}"
        self.spec = spec
        self.settings = settings
        self.device = torch.device(device)
        self.gru_path = gru_path
        self.mirror_queue = device != "cpu" if mirror_queue is None else mirror_queue
        self.queue: DeviceQueue | None = None
        self.bank: DeviceBank | None = None  # made at the first batch that carries a bank
        self.model = QueryTower(spec).to(self.device)
        self._named = dict(self.model.named_parameters())
        self.optimizer: torch.optim.AdamW | None  # None: a tower without parameters
        self.data_parallel: GradientSum | None = None  # set by join_data_parallel
        self.load_state(params)

    def join_data_parallel(
        self, rank: int, world: int, ledger: CollectiveLedger | None = None
    ) -> GradientSum:
        """Train as rank `rank` of `world` (torch.distributed's default group must be up):
        each batch then holds this rank's shard of the queries and the global batch's
        positives, and gradients and loss are summed over ranks before clip and AdamW
        (counted in `ledger`)."""
        self.data_parallel = GradientSum(rank, world, ledger)
        return self.data_parallel

    def _new_optimizer(self) -> torch.optim.AdamW:
        s = self.settings
        return torch.optim.AdamW(
            self.model.parameters(),
            lr=s.lr,
            betas=(s.beta1, s.beta2),
            eps=s.eps,
            weight_decay=s.weight_decay,
        )

    def load_state(self, state: Mapping[str, Any]) -> None:
        params, moments, step = split_state(self.spec, state)
        with torch.no_grad():
            for name, value in params.items():
                self._named[name].copy_(torch.from_numpy(value))
        self.optimizer = self._new_optimizer() if self._named else None
        if self.optimizer is None or moments is None or step == 0:
            return
        for name, (exp_avg, exp_avg_sq) in moments.items():
            self.optimizer.state[self._named[name]] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.from_numpy(exp_avg).to(self.device),
                "exp_avg_sq": torch.from_numpy(exp_avg_sq).to(self.device),
            }

    def state(self) -> dict[str, np.ndarray]:
        params = {name: p.detach().cpu().numpy() for name, p in self._named.items()}
        moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        step = 0
        for name, p in self._named.items():
            assert self.optimizer is not None  # a tower with parameters has one
            slot = self.optimizer.state.get(p)
            if slot:
                moments[name] = (slot["exp_avg"].cpu().numpy(), slot["exp_avg_sq"].cpu().numpy())
                step = int(slot["step"])
            else:
                moments[name] = (np.zeros(p.shape, np.float32), np.zeros(p.shape, np.float32))
        return join_state(params, moments, step)

    def queue_mirror(self, ids: np.ndarray, vecs: np.ndarray) -> DeviceQueue | None:
        """A device copy of the memory-bank ring ids (Q,), vecs (Q, D) that steps read
        instead of sending vecs each time; None where torch reads the ring in place (CPU,
        unless mirror_queue=True). The caller keeps it current (`MemoryQueue.attach`)."""
        self.queue = DeviceQueue(ids, vecs, self.device) if self.mirror_queue else None
        return self.queue

    def _bank_for(self, batch: Batch) -> DeviceBank | None:
        """batch.bank on this device: made once per bank array, reused by every later step."""
        if batch.bank is None:
            return None
        if self.bank is None or self.bank.host is not batch.bank:
            self.bank = DeviceBank(batch.bank, self.device)
        return self.bank

    def _queries(self, contexts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(contexts, dtype=np.float32), device=self.device)
        return self.model(x, torch.as_tensor(np.asarray(lengths, dtype=np.int64)), self.gru_path)

    def encode(self, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._queries(contexts, lengths).cpu().numpy()

    def _backward(self, batch: Batch) -> float:
        """Gradients into .grad (summed over ranks in a data-parallel run); returns the loss."""
        self.model.zero_grad(set_to_none=True)
        shard = self.data_parallel
        first_row = 0  # a batch with the global batch's positives holds one rank's queries
        if shard is not None and len(batch.positive_ids) > len(batch.contexts):
            first_row = shard.first_row(len(batch.contexts))
        loss = infonce(
            self._queries(batch.contexts, batch.lengths),
            batch,
            self.settings.temperature,
            self.queue,
            first_row,
            self._bank_for(batch),
        )
        loss.backward()
        if shard is not None:
            return shard.reduce(list(self._named.values()), loss)
        return float(loss.detach())

    def loss_and_grads(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        loss = self._backward(batch)
        grads = {}
        for name, p in self._named.items():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[name] = grad.cpu().numpy().copy()
        return loss, grads

    def step(self, batch: Batch, lr: float | None = None) -> StepStats:
        loss = self._backward(batch)
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm))
        if not (np.isfinite(loss) and np.isfinite(norm)):
            self.model.zero_grad(set_to_none=True)
            return StepStats(loss=loss, grad_norm=norm, applied=False)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.lr if lr is None else lr
            self.optimizer.step()
        return StepStats(loss=loss, grad_norm=norm, applied=True)

"""One training step at the seed's shape, engine by engine, beside a plain PyTorch loop.

Shape: B=32, T=10 (full-length sequences, so FLOPs are exact), D=H=768, K=8 hard
negatives, Q=4096 queue. The baseline is what a user writes by hand: nn.GRU with
packed sequences, nn.Linear, F.normalize, a masked cross-entropy,
clip_grad_norm_ and AdamW. Targets: torch-cpu <= 1.05x the plain loop; numpy
<= 1.2x torch-cpu. The recipe options (residual tower, seen-item masking, a
scheduled rate) are measured against the same engine without them.

    pytest bench/test_backends.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from bench.report import RatioReport, gemm_gflops
from twotower import Batch, backends

B, T, D, H, K, Q, M = 32, 10, 768, 768, 8, 4096, 50_000
TAU = 0.05
ROUNDS = 8


REPORT_TITLE = "backends: one training step, B=32 T=10 D=H=768 K=8 Q=4096"


def step_flops(tower: str) -> float:
    """Multiply-adds x 2 of one step; the backward pass costs twice the forward GEMMs."""
    loss = 2 * B * D * (B + K + Q)
    if tower == "gru":
        forward = 2 * B * T * (D * 3 * H + H * 3 * H) + 2 * B * H * D
    else:
        forward = 2 * B * D * D
    return 3 * (forward + loss)


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((M, D), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    made = []
    for _ in range(4):
        positive_ids = rng.choice(M, B, replace=False)
        hard_ids = rng.integers(0, M, (B, K))
        queue_ids = rng.integers(0, M, Q)
        made.append(
            Batch(
                contexts=rng.standard_normal((B, T, D), dtype=np.float32),
                lengths=np.full(B, T, dtype=np.int64),
                positive_ids=positive_ids,
                positive_vecs=bank[positive_ids],
                hard_ids=hard_ids,
                hard_vecs=bank[hard_ids],
                queue_ids=queue_ids,
                queue_vecs=bank[queue_ids],
            )
        )
    return made


def cycle(items: list):
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


class PlainTower(nn.Module):
    """The hand-written model: the same parameters as twotower's tower."""

    def __init__(self, tower: str):
        super().__init__()
        self.tower = tower
        if tower == "gru":
            self.gru = nn.GRU(D, H, 1, batch_first=True)
            self.proj = nn.Linear(H, D)
        else:
            self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.tower == "gru":
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, h_n = self.gru(packed)
            features = h_n[-1]
        else:
            active = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            features = (x * active[:, :, None]).sum(1) / lengths[:, None]
        return F.normalize(self.proj(features), dim=1)


def plain_torch_step(tower: str):
    model = PlainTower(tower)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    targets = torch.arange(B)

    def step(batch: Batch) -> float:
        positive_ids = torch.from_numpy(batch.positive_ids)
        hard_ids = torch.from_numpy(batch.hard_ids)
        queue_ids = torch.from_numpy(batch.queue_ids)
        positives = torch.from_numpy(batch.positive_vecs)
        q = model(torch.from_numpy(batch.contexts), torch.from_numpy(batch.lengths))
        logits = (
            torch.cat(
                [
                    q @ positives.T,
                    torch.bmm(torch.from_numpy(batch.hard_vecs), q[:, :, None])[:, :, 0],
                    q @ torch.from_numpy(batch.queue_vecs).T,
                ],
                dim=1,
            )
            / TAU
        )
        same = positive_ids[:, None] == positive_ids[None, :]
        same.fill_diagonal_(False)
        mask = torch.cat(
            [
                same,
                (hard_ids == positive_ids[:, None]) | (hard_ids < 0),
                (queue_ids[None, :] == positive_ids[:, None]) | (queue_ids[None, :] < 0),
            ],
            dim=1,
        )
        loss = F.cross_entropy(logits.masked_fill(mask, float("-inf")), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def test_gemm_peak(benchmark, report: RatioReport) -> None:
    """The machine's float32 GEMM rate, measured in this run, for the % peak column."""
    report.peak_gflops = benchmark.pedantic(gemm_gflops, rounds=1, iterations=1)
    assert report.peak_gflops > 0


@pytest.mark.parametrize("tower", ["gru", "meanpool"])
@pytest.mark.parametrize("engine", ["plain-torch", "torch-cpu", "numpy"])
def test_training_step(
    benchmark, report: RatioReport, batches: list[Batch], engine: str, tower: str
) -> None:
    if engine == "plain-torch":
        step = plain_torch_step(tower)
        baseline = None
    else:
        backend = backends.get(engine, tower=tower, dim=D, hidden=H)
        step = lambda batch: backend.step(batch).loss  # noqa: E731
        baseline = f"plain-torch {tower}" if engine == "torch-cpu" else f"torch-cpu {tower}"
    next_batch = cycle(batches)
    loss = benchmark.pedantic(lambda: step(next_batch()), rounds=ROUNDS, warmup_rounds=2)
    assert np.isfinite(loss)
    report.add(f"{engine} {tower}", benchmark, baseline=baseline, flops=step_flops(tower))


@pytest.mark.parametrize("engine", ["torch-cpu", "numpy"])
def test_training_step_with_the_recipe_options(
    benchmark, report: RatioReport, batches: list[Batch], engine: str
) -> None:
    """--residual last --exclude-context and a scheduled rate, beside `engine gru` plain."""
    rng = np.random.default_rng(1)
    seen = []
    for batch in batches:
        context_ids = rng.integers(0, M, (B, T))
        context_ids[:, 0] = batch.queue_ids[:B]  # some seen items sit in the queue
        seen.append(Batch(**{**batch.__dict__, "context_ids": context_ids}))
    backend = backends.get(engine, tower="gru", dim=D, hidden=H, residual="last")
    next_batch = cycle(seen)
    loss = benchmark.pedantic(
        lambda: backend.step(next_batch(), 5e-4).loss, rounds=ROUNDS, warmup_rounds=2
    )
    assert np.isfinite(loss)
    report.add(
        f"{engine} gru + recipe options",
        benchmark,
        baseline=f"{engine} gru",
        flops=step_flops("gru"),
    )

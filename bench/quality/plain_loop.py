"""The loop a user writes by hand: nn.GRU + nn.Linear, InfoNCE over in-batch negatives only,
AdamW at a constant rate, a fixed number of epochs, the last parameters kept. The quality
benchmark's point of comparison; it shares nothing with twotower but the data arrays."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PlainTower(nn.Module):
    """q = normalize(proj(h_last)) of a one-layer GRU over the context vectors."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, contexts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            contexts, lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.gru(packed)
        return F.normalize(self.proj(h[-1]), dim=-1)


def gather(bank: np.ndarray, context_ids: np.ndarray) -> np.ndarray:
    """Context vectors (B, T, D) for ids (B, T), zeros at the -1 padding."""
    vectors = np.asarray(bank[np.maximum(context_ids, 0)], dtype=np.float32)
    vectors[context_ids < 0] = 0.0
    return vectors


def train_plain_gru(
    bank: np.ndarray,
    context_ids: np.ndarray,
    lengths: np.ndarray,
    positives: np.ndarray,
    epochs: int,
    hidden: int = 768,
    batch_size: int = 32,
    lr: float = 1e-3,
    temperature: float = 0.05,
    seed: int = 0,
) -> PlainTower:
    """Train on every given row for `epochs` epochs; returns the tower in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = PlainTower(bank.shape[1], hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(epochs):
        order = rng.permutation(len(positives))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = np.sort(order[start : start + batch_size])
            contexts = torch.from_numpy(gather(bank, context_ids[rows]))
            ids = torch.from_numpy(positives[rows].astype(np.int64))
            targets = torch.from_numpy(np.asarray(bank[positives[rows]], dtype=np.float32))
            q = model(contexts, torch.from_numpy(lengths[rows].astype(np.int64)))
            logits = q @ targets.T / temperature
            duplicate = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
            logits = logits.masked_fill(duplicate, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(len(ids)))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model.eval()


def encoder(model: PlainTower):  # type: ignore[no-untyped-def]
    """encode(contexts (B, T, D), lengths (B,)) -> (B, D) float32, for evaluation.rank_rows."""

    def encode(contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            q = model(torch.from_numpy(contexts), torch.from_numpy(lengths.astype(np.int64)))
        return q.numpy().astype(np.float32)

    return encode

"""Small towers for the reference's own tests, parameters away from init, and q computed by
torch modules in float64 (an independent computation of the towers)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from twotower import Batch
from twotower.towers import TowerSpec, init_params

DIM, HIDDEN = 6, 5
TOWERS = {
    "gru-1": TowerSpec("gru", DIM, HIDDEN, 1),
    "gru-2": TowerSpec("gru", DIM, HIDDEN, 2),
    "gru-2-residual": TowerSpec("gru", DIM, HIDDEN, 2, residual="last"),
    "meanpool": TowerSpec("meanpool", DIM, DIM),
}


def random_params(spec: TowerSpec, seed: int) -> dict[str, np.ndarray]:
    """Float64 parameters away from init (meanpool starts at the identity, too special)."""
    rng = np.random.default_rng(seed)
    return {
        name: p.astype(np.float64) + 0.3 * rng.standard_normal(p.shape)
        for name, p in init_params(spec, seed).items()
    }


# --- an independent float64 torch computation -------------------------------------------


def torch_queries(spec: TowerSpec, params: dict[str, np.ndarray], batch: Batch) -> tuple:
    """q (B, D) from torch modules in float64, with leaf tensors for every parameter."""
    leaves = {
        name: torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
        for name, value in params.items()
    }
    x = torch.tensor(batch.contexts, dtype=torch.float64)
    lengths = torch.tensor(batch.lengths)
    if spec.kind == "gru":
        gru = torch.nn.GRU(spec.dim, spec.hidden, spec.layers, batch_first=True).double()
        for name, _ in list(gru.named_parameters()):
            setattr(gru, name, leaves[f"gru.{name}"])
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h_n = gru(packed)
        features = h_n[-1]
    else:
        rows = [x[i, : int(length)].mean(dim=0) for i, length in enumerate(lengths)]
        features = torch.stack(rows)
    y = features @ leaves["proj.weight"].T + leaves["proj.bias"]
    if spec.residual == "last":
        y = y + torch.stack([x[i, int(length) - 1] for i, length in enumerate(lengths)])
    return F.normalize(y, dim=1), leaves

"""The float64 NumPy reference: what the right numbers are.

Every engine and miner in twotower is checked against this package; it never
imports twotower (only numpy), so it cannot inherit an engine's bug.

    q = reference.encode("gru", params, contexts, lengths)            # (B, D)
    loss, grads = reference.loss_and_grads("gru", params, batch, 0.05)
    f = reference.lr_factor(step, "cosine", warmup, total)            # the lr schedule
    params, opt, loss, norm = reference.train_step("gru", params, opt, batch, lr=lr * f)

`batch` is any object with the attributes of `twotower.Batch` (`context_ids`
optional: present and not None turns seen-item masking on; `sampled_ids`,
`in_batch_logq` / `queue_logq` and `full_softmax` likewise optional: sampled bank
negatives, logQ, the softmax over the whole bank). `residual="last"` selects the
residual GRU tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from reference.bank import full_softmax
from reference.loss import infonce
from reference.optim import LR_SCHEDULES, adamw, clip_grad_norm, lr_factor
from reference.towers import RESIDUALS, TOWERS

__all__ = [
    "encode",
    "loss_and_grads",
    "train_step",
    "infonce",
    "full_softmax",
    "adamw",
    "clip_grad_norm",
    "lr_factor",
    "LR_SCHEDULES",
    "RESIDUALS",
]


def encode(
    tower: str,
    params: Mapping[str, np.ndarray],
    contexts: np.ndarray,
    lengths: np.ndarray,
    residual: str = "none",
) -> np.ndarray:
    """Unit query vectors (B, D) float64 for contexts (B, T, D) and lengths (B,)."""
    forward, _ = TOWERS[tower]
    q, _ = forward(params, contexts, np.asarray(lengths, dtype=np.int64), residual)
    return q


def loss_and_grads(
    tower: str,
    params: Mapping[str, np.ndarray],
    batch: Any,
    temperature: float = 0.05,
    residual: str = "none",
) -> tuple[float, dict[str, np.ndarray]]:
    """InfoNCE loss of `batch` and its gradient for every parameter (float64, by torch name):
    over its candidates (`infonce`), or over every bank row when `batch.full_softmax`."""
    forward, backward = TOWERS[tower]
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    q, cache = forward(params, batch.contexts, lengths, residual)
    if getattr(batch, "full_softmax", False):
        loss, dq = full_softmax(q, batch, temperature)
    else:
        loss, dq = infonce(q, batch, temperature)
    return loss, backward(params, lengths, cache, dq)


def train_step(
    tower: str,
    params: Mapping[str, np.ndarray],
    opt: Mapping[str, Any],
    batch: Any,
    temperature: float = 0.05,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    residual: str = "none",
) -> tuple[dict[str, np.ndarray], dict[str, Any], float, float]:
    """Loss, gradients, global-norm clipping, AdamW: one training step.

    `opt` holds "step" (steps taken) and per-parameter "exp_avg" and
    "exp_avg_sq" dicts; an empty mapping means a fresh optimizer. `lr` is
    this step's rate: a schedule passes lr * lr_factor(step, ...).
    Returns (new params, new opt, loss, gradient norm before clipping).
    """
    loss, grads = loss_and_grads(tower, params, batch, temperature, residual)
    clipped, norm = clip_grad_norm(grads, max_grad_norm)
    zeros = {name: np.zeros(np.shape(p)) for name, p in params.items()}
    new_params, exp_avg, exp_avg_sq, step = adamw(
        params,
        clipped,
        opt.get("exp_avg", zeros),
        opt.get("exp_avg_sq", zeros),
        int(opt.get("step", 0)),
        lr=lr,
        weight_decay=weight_decay,
    )
    return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, loss, norm

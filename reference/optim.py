"""Global-norm gradient clipping, AdamW with torch's semantics, and the learning-rate
schedule, in float64."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def clip_grad_norm(grads: Arrays, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when below 1.

    Returns the scaled gradients and the global L2 norm before scaling.
    """
    total = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))
    scale = min(1.0, max_norm / (total + 1e-6))
    return {name: np.asarray(g, dtype=np.float64) * scale for name, g in grads.items()}, total


def adamw(
    params: Arrays,
    grads: Arrays,
    exp_avg: Arrays,
    exp_avg_sq: Arrays,
    step: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """One torch.optim.AdamW step. `step` counts the steps already taken.

    Decoupled decay first (p -= lr * wd * p), then bias-corrected moments with
    eps added outside the square root. Returns new params, moments and step.
    """
    beta1, beta2 = betas
    step += 1
    new_params, new_avg, new_avg_sq = {}, {}, {}
    for name, p in params.items():
        g = np.asarray(grads[name], dtype=np.float64)
        p = np.asarray(p, dtype=np.float64) * (1.0 - lr * weight_decay)
        m = beta1 * np.asarray(exp_avg[name], dtype=np.float64) + (1.0 - beta1) * g
        v = beta2 * np.asarray(exp_avg_sq[name], dtype=np.float64) + (1.0 - beta2) * g * g
        m_hat = m / (1.0 - beta1**step)
        v_hat = v / (1.0 - beta2**step)
        new_params[name] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        new_avg[name], new_avg_sq[name] = m, v
    return new_params, new_avg, new_avg_sq, step


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """f(s) of docs/DESIGN.md: the update of step `step` (steps done before it) uses lr * f(s).

    Warm-up: f = (s + 1) / warmup for s < warmup. After it, over the planned
    total S = `total`: constant 1; linear max(0, (S - s) / (S - W)); cosine
    0.5 * (1 + cos(pi * (s - W) / (S - W))), its progress capped at 1 (steps
    past the plan stay at f = 0 instead of climbing back).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; one of {LR_SCHEDULES}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if total <= warmup:  # no decay phase was planned: past the plan
        return 0.0
    if schedule == "linear":
        return max(0.0, (total - step) / (total - warmup))
    progress = min(1.0, (step - warmup) / (total - warmup))
    return float(0.5 * (1.0 + np.cos(np.pi * progress)))

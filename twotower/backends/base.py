"""The Backend protocol every compute engine implements, and what they share.

A backend owns a tower's parameters and optimizer state, computes the
InfoNCE loss and its gradients, and applies clip + AdamW. It exchanges only
NumPy arrays with the rest of twotower, so state moves between engines as is.

State names: parameters by their torch names (see `twotower.towers`), the
optimizer under `opt.exp_avg.<name>`, `opt.exp_avg_sq.<name>` and `opt.step`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from twotower.batch import Batch, StepStats
from twotower.towers import TowerSpec

OPT_STEP = "opt.step"
OPT_EXP_AVG = "opt.exp_avg."
OPT_EXP_AVG_SQ = "opt.exp_avg_sq."


@dataclass(frozen=True)
class StepSettings:
    """Loss and optimizer hyper-parameters (docs/DESIGN.md defaults)."""

    temperature: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@runtime_checkable
class Backend(Protocol):
    """A compute engine for one query tower."""

    name: str
    spec: TowerSpec
    settings: StepSettings

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take parameters alone (the optimizer starts fresh) or a full `state()`."""

    def state(self) -> dict[str, np.ndarray]:
        """Parameters (float32, torch names) and optimizer moments, as fresh NumPy copies."""

    def encode(self, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """contexts (B, T, D) float32, lengths (B,) -> unit query vectors (B, D) float32."""

    def loss_and_grads(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """The batch's loss and the gradient of every parameter; nothing is updated."""

    def step(self, batch: Batch, lr: float | None = None) -> StepStats:
        """Loss, gradients, global-norm clip and AdamW at rate `lr` (None: settings.lr; a
        schedule passes this step's rate). A non-finite loss or gradient leaves parameters
        and optimizer untouched (applied=False)."""


def split_state(
    spec: TowerSpec, state: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]] | None, int]:
    """Check `state` against the tower and split it.

    Returns (params float32, {name: (exp_avg, exp_avg_sq)} or None when the
    state holds parameters alone, steps taken).
    """
    params = {
        name: np.asarray(state[name], dtype=np.float32) for name in spec.shapes() if name in state
    }
    spec.check_state(params)
    if OPT_STEP not in state:
        return params, None, 0
    moments = {
        name: (
            np.asarray(state[OPT_EXP_AVG + name], dtype=np.float32),
            np.asarray(state[OPT_EXP_AVG_SQ + name], dtype=np.float32),
        )
        for name in params
    }
    return params, moments, int(np.asarray(state[OPT_STEP]))


def join_state(
    params: Mapping[str, np.ndarray],
    moments: Mapping[str, tuple[np.ndarray, np.ndarray]],
    step: int,
) -> dict[str, np.ndarray]:
    """The inverse of `split_state`: one flat dict of fresh arrays."""
    state = {name: np.array(value, dtype=np.float32) for name, value in params.items()}
    for name, (exp_avg, exp_avg_sq) in moments.items():
        state[OPT_EXP_AVG + name] = np.array(exp_avg, dtype=np.float32)
        state[OPT_EXP_AVG_SQ + name] = np.array(exp_avg_sq, dtype=np.float32)
    state[OPT_STEP] = np.array(step, dtype=np.int64)
    return state

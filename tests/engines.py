"""The engines the agreement tests run (every available one, and torch's masked GRU path), the
small towers they build, and the check of one engine's loss and gradients against the reference."""

from __future__ import annotations

import numpy as np

import reference
from tests.agreement import assert_agrees
from twotower import Batch, backends

DIM, HIDDEN = 32, 24
TOWERS = {
    "gru-1": dict(tower="gru", dim=DIM, hidden=HIDDEN, layers=1),
    "gru-2": dict(tower="gru", dim=DIM, hidden=HIDDEN, layers=2),
    "meanpool": dict(tower="meanpool", dim=DIM, hidden=DIM),
}
# every available engine, and the torch engine's second GRU path (the one MPS uses)
ENGINES = [(name, {}) for name in backends.available()]
if "torch-cpu" in backends.available():
    ENGINES.append(("torch-cpu", {"gru_path": "masked"}))
ENGINE_IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in ENGINES]


def engine(name: str, opts: dict, tower: str, **settings) -> backends.Backend:
    """Engine `name` with engine options `opts` for one of TOWERS, seeded init (seed 3)."""
    return backends.get(name, **TOWERS[tower], seed=3, **settings, **opts)


def params_of(backend: backends.Backend) -> dict[str, np.ndarray]:
    """The backend's parameters by name, without the optimizer state."""
    return {k: v for k, v in backend.state().items() if not k.startswith("opt.")}


def assert_matches_reference(
    backend: backends.Backend, kind: str, batch: Batch
) -> tuple[float, dict[str, np.ndarray]]:
    """The engine's loss and every gradient on `batch` agree with the reference's (returned)."""
    loss, grads = backend.loss_and_grads(batch)
    expected_loss, expected_grads = reference.loss_and_grads(kind, params_of(backend), batch, 0.05)
    assert_agrees(np.float32(loss), np.array(expected_loss), np.float32, "loss")
    assert set(grads) == set(expected_grads)
    for param_name, grad in grads.items():
        assert_agrees(grad, expected_grads[param_name], np.float32, param_name)
    return expected_loss, expected_grads

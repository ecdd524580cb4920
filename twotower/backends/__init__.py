"""Compute engines by name: `available()`, `describe()`, `get(name, ...)`.

    numpy        float32 NumPy engine; runs anywhere, the last-resort fallback
    torch-cpu    torch on the CPU
    torch-mps    torch on Apple silicon (macOS)
    torch-cuda   torch on an NVIDIA GPU

Each engine says whether this machine can run it and, if not, why; asking
for one it cannot run raises `EngineUnavailable` with that reason and the
list of engines that are available.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twotower.backends.base import Backend, StepSettings
from twotower.errors import EngineUnavailable
from twotower.towers import TowerSpec, init_params

__all__ = ["Backend", "StepSettings", "EngineInfo", "available", "describe", "get", "NAMES"]

NAMES = ("numpy", "torch-cpu", "torch-mps", "torch-cuda")


@dataclass(frozen=True)
class EngineInfo:
    """One known engine: its name, whether this machine can run it, and why (not)."""

    name: str
    available: bool
    reason: str


def _torch_reason(device: str) -> str | None:
    """None if torch can run on `device` here, else why not."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install torch)"
    import torch

    if device == "mps" and not torch.backends.mps.is_available():
        if platform.system() != "Darwin":
            return "MPS needs macOS on Apple silicon"
        return "this torch build or Mac has no MPS device"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


_REASONS: dict[str, Callable[[], str | None]] = {
    "numpy": lambda: None,
    "torch-cpu": lambda: _torch_reason("cpu"),
    "torch-mps": lambda: _torch_reason("mps"),
    "torch-cuda": lambda: _torch_reason("cuda"),
}


def describe() -> list[EngineInfo]:
    """Every known backend, available or not, with the reason."""
    infos = []
    for name in NAMES:
        reason = _REASONS[name]()
        infos.append(EngineInfo(name, reason is None, reason or "ok"))
    return infos


def available() -> list[str]:
    """Names of the backends this machine can run, in fallback order of preference."""
    return [info.name for info in describe() if info.available]


def get(
    name: str,
    tower: str = "gru",
    dim: int = 768,
    hidden: int = 768,
    layers: int = 1,
    *,
    proj: bool = True,
    temperature: float = 0.05,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    **engine_opts: Any,
) -> Backend:
    """A ready backend with the tower's seeded initial parameters (`towers.init_params`).

    engine_opts go to the engine: `gru_path="packed"|"masked"` for torch.
    Raises EngineUnavailable (a UsageError) for an unknown or unavailable name.
    """
    if name not in _REASONS:
        raise EngineUnavailable(f"unknown backend {name!r}; known: {', '.join(NAMES)}")
    reason = _REASONS[name]()
    if reason is not None:
        raise EngineUnavailable(
            f"{name} is not available here ({reason}); available: {', '.join(available())}"
        )
    spec = TowerSpec(kind=tower, dim=dim, hidden=hidden, layers=layers, proj=proj)
    settings = StepSettings(
        temperature=temperature, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm
    )
    params = init_params(spec, seed)
    if name == "numpy":
        from twotower.backends.numpy_backend import NumpyBackend

        return NumpyBackend(spec, settings, params, **engine_opts)
    from twotower.backends.torch_backend import TorchBackend

    return TorchBackend(spec, settings, params, device=name.removeprefix("torch-"), **engine_opts)

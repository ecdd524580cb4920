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

import platform
from typing import Any

from twotower.backends.base import Backend, StepSettings
from twotower.registry import EngineInfo, EngineRegistry, missing_module_reason
from twotower.towers import TowerSpec, init_params

__all__ = ["Backend", "StepSettings", "EngineInfo", "available", "describe", "get", "NAMES"]


def _torch_reason(device: str) -> str | None:
    """None if torch can run on `device` here, else why not."""
    missing = missing_module_reason("torch", "torch")()
    if missing is not None:
        return missing
    import torch

    if device == "mps" and not torch.backends.mps.is_available():
        if platform.system() != "Darwin":
            return "MPS needs macOS on Apple silicon"
        return "this torch build or Mac has no MPS device"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


REGISTRY = EngineRegistry(
    "backend",
    {
        "numpy": lambda: None,
        "torch-cpu": lambda: _torch_reason("cpu"),
        "torch-mps": lambda: _torch_reason("mps"),
        "torch-cuda": lambda: _torch_reason("cuda"),
    },
)
NAMES = REGISTRY.names
describe = REGISTRY.describe
available = REGISTRY.available


def get(
    name: str,
    tower: str = "gru",
    dim: int = 768,
    hidden: int = 768,
    layers: int = 1,
    *,
    proj: bool = True,
    residual: str = "none",
    temperature: float = 0.05,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    **engine_opts: Any,
) -> Backend:
    """A ready backend with the tower's seeded initial parameters (`towers.init_params`).

    engine_opts go to the engine: `gru_path="packed"|"masked"` for torch.
    Raises twotower.errors.EngineUnavailable (a UsageError) for an unknown or unavailable name.
    """
    REGISTRY.require(name)
    spec = TowerSpec(
        kind=tower, dim=dim, hidden=hidden, layers=layers, proj=proj, residual=residual
    )
    settings = StepSettings(
        temperature=temperature, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm
    )
    params = init_params(spec, seed)
    if name == "numpy":
        from twotower.backends.numpy_backend import NumpyBackend

        return NumpyBackend(spec, settings, params, **engine_opts)
    from twotower.backends.torch_backend import TorchBackend

    return TorchBackend(spec, settings, params, device=name.removeprefix("torch-"), **engine_opts)


def resolve(name: str) -> str:
    """'auto' -> torch-cpu where torch is installed, else numpy; other names unchanged."""
    if name != "auto":
        return name
    return "torch-cpu" if "torch-cpu" in available() else "numpy"


def make_backend(config: Any, dim: int, name: str | None = None) -> Backend:
    """The backend a TrainConfig asks for (or `name`, e.g. a fallback), for vectors of size dim."""
    name = resolve(name or config.backend)
    opts: dict[str, Any] = {}
    if name.startswith("torch-"):
        opts = {"gru_path": config.gru_path, "deterministic": config.deterministic}
    return get(
        name,
        tower=config.tower,
        dim=dim,
        hidden=config.hidden if config.tower == "gru" else dim,
        layers=config.layers,
        proj=config.proj,
        residual=config.residual,
        temperature=config.temperature,
        lr=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        **opts,
    )

"""Tower specs: which parameters a query tower has, their shapes, and their seeded init.

Names and shapes are torch's (`nn.GRU` + `nn.Linear`), so a user's state dict
loads unchanged. Init happens once, here, in NumPy, so every backend starts
from the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.towers import RESIDUALS
from twotower.errors import UsageError
from twotower.seeds import init_rng

TOWER_KINDS = ("gru", "meanpool")


@dataclass(frozen=True)
class TowerSpec:
    """The shape of a query tower.

    kind: "gru" (a GRU over the context sequence) or "meanpool".
    dim: D, the context and document vector size; hidden: H; layers: L (GRU only).
    proj: whether a `proj` Linear maps the pooled state to D (meanpool without
    it is the parameter-free baseline q = normalize(mean)).
    residual (GRU only): "none", or "last" for q = normalize(x_last + proj(h_last)),
    x_last the sequence's last real context vector, with proj zero-initialised.
    """

    kind: str = "gru"
    dim: int = 768
    hidden: int = 768
    layers: int = 1
    proj: bool = True
    residual: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in TOWER_KINDS:
            raise UsageError(f"unknown tower {self.kind!r}; choose one of {', '.join(TOWER_KINDS)}")
        if self.kind == "gru" and not self.proj:
            raise UsageError("the gru tower needs its projection; --no-proj is for meanpool")
        if self.residual not in RESIDUALS:
            raise UsageError(
                f"unknown residual {self.residual!r}; choose one of {', '.join(RESIDUALS)}"
            )
        if self.residual != "none" and self.kind != "gru":
            raise UsageError("--residual is a gru option (meanpool already starts at the mean)")
        for field, value in (("dim", self.dim), ("hidden", self.hidden), ("layers", self.layers)):
            if value < 1:
                raise UsageError(f"tower {field} must be >= 1, got {value}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, in torch's order."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.kind == "gru":
            for layer in range(self.layers):
                fan_in = self.dim if layer == 0 else self.hidden
                shapes[f"gru.weight_ih_l{layer}"] = (3 * self.hidden, fan_in)
                shapes[f"gru.weight_hh_l{layer}"] = (3 * self.hidden, self.hidden)
                shapes[f"gru.bias_ih_l{layer}"] = (3 * self.hidden,)
                shapes[f"gru.bias_hh_l{layer}"] = (3 * self.hidden,)
            shapes["proj.weight"] = (self.dim, self.hidden)
            shapes["proj.bias"] = (self.dim,)
        elif self.proj:
            shapes["proj.weight"] = (self.dim, self.dim)
            shapes["proj.bias"] = (self.dim,)
        return shapes

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Raise UsageError naming the first parameter that is missing or misshapen."""
        for name, shape in self.shapes().items():
            if name not in state:
                raise UsageError(f"state has no parameter {name!r} (a {self.kind} tower needs it)")
            if tuple(np.shape(state[name])) != shape:
                raise UsageError(
                    f"parameter {name!r} has shape {tuple(np.shape(state[name]))}, "
                    f"the tower needs {shape}"
                )


def init_params(spec: TowerSpec, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 parameters with torch's default ranges.

    GRU weights and biases ~ U(-1/sqrt(H), 1/sqrt(H)); the GRU tower's proj is
    a default nn.Linear, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), or zeros with
    residual "last" (so step 0 is exactly the last-item baseline; the GRU
    weights are drawn as without it); the meanpool proj starts as the identity
    with zero bias.
    """
    rng = init_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in spec.shapes().items():
        if spec.kind == "meanpool":
            value = np.eye(spec.dim) if name == "proj.weight" else np.zeros(shape)
        else:
            fan_in = spec.hidden
            value = rng.uniform(-1.0, 1.0, size=shape) / np.sqrt(fan_in)
            if spec.residual != "none" and name.startswith("proj."):
                value = np.zeros(shape)
        params[name] = value.astype(np.float32)
    return params

"""Query towers in float64: each forward with its backward right beside it.

This is the spec the fast engines are checked against: slow, obvious, and
written to read like the equations in docs/DESIGN.md. It imports numpy only.

Parameter names are torch's (`gru.weight_ih_l0`, `proj.weight`, ...), so a
state dict from `nn.GRU` + `nn.Linear` can be used as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Params = Mapping[str, np.ndarray]
NORM_EPS = 1e-12


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, written through tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --- L2 normalisation -------------------------------------------------------


def normalize(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q = y / max(||y||, 1e-12) row-wise. y (B, D) -> (q (B, D), norm (B, 1))."""
    norm = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), NORM_EPS)
    return y / norm, norm


def normalize_backward(dq: np.ndarray, q: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """dL/dy from dL/dq. Where the norm was clamped to 1e-12 it is a constant."""
    projected = dq - q * np.sum(q * dq, axis=1, keepdims=True)
    clamped = norm <= NORM_EPS
    return np.where(clamped, dq, projected) / norm


# --- one GRU layer (torch nn.GRU semantics, gate order r, z, n; h0 = 0) ---------


def gru_layer_forward(
    x: np.ndarray,
    lengths: np.ndarray,
    w_ih: np.ndarray,
    w_hh: np.ndarray,
    b_ih: np.ndarray,
    b_hh: np.ndarray,
) -> tuple[np.ndarray, list[tuple[Any, ...]]]:
    """Run one layer over x (B, T, In); sequence i stops at lengths[i].

    Returns the outputs (B, T, H) -- after its length a sequence's state is
    frozen -- and what the backward pass needs, one tuple per time step.
    """
    batch, steps, _ = x.shape
    hidden = w_hh.shape[1]
    h = np.zeros((batch, hidden))
    outputs = np.zeros((batch, steps, hidden))
    cache = []
    for t in range(steps):
        active = (t < lengths)[:, None]
        x_t = np.where(active, x[:, t], 0.0)  # packed semantics: padding is never read
        gi = x_t @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        r = sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = sigmoid(gi[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
        gh_n = gh[:, 2 * hidden :]
        n = np.tanh(gi[:, 2 * hidden :] + r * gh_n)
        h_new = (1.0 - z) * n + z * h
        cache.append((x_t, h, r, z, n, gh_n, active))
        h = np.where(active, h_new, h)
        outputs[:, t] = h
    return outputs, cache


def gru_layer_backward(
    d_outputs: np.ndarray,
    cache: list[tuple[Any, ...]],
    w_ih: np.ndarray,
    w_hh: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward through time. d_outputs (B, T, H) is dL/d(outputs) at every step.

    Returns dL/dx (B, T, In) and the gradients of w_ih, w_hh, b_ih, b_hh.
    """
    batch, steps, hidden = d_outputs.shape
    grads = {
        "w_ih": np.zeros_like(w_ih),
        "w_hh": np.zeros_like(w_hh),
        "b_ih": np.zeros(w_ih.shape[0]),
        "b_hh": np.zeros(w_hh.shape[0]),
    }
    dx = np.zeros((batch, steps, w_ih.shape[1]))
    dh = np.zeros((batch, hidden))
    for t in reversed(range(steps)):
        x_t, h_prev, r, z, n, gh_n, active = cache[t]
        dh = dh + d_outputs[:, t]
        dh_new = np.where(active, dh, 0.0)
        dh_prev = np.where(active, 0.0, dh)  # a frozen state passes its gradient straight back
        dn = dh_new * (1.0 - z)
        dz = dh_new * (h_prev - n)
        dh_prev = dh_prev + dh_new * z
        dn_pre = dn * (1.0 - n**2)
        dr_pre = dn_pre * gh_n * r * (1.0 - r)
        dz_pre = dz * z * (1.0 - z)
        d_gi = np.concatenate([dr_pre, dz_pre, dn_pre], axis=1)
        d_gh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1)
        grads["w_ih"] += d_gi.T @ x_t
        grads["b_ih"] += d_gi.sum(axis=0)
        grads["w_hh"] += d_gh.T @ h_prev
        grads["b_hh"] += d_gh.sum(axis=0)
        dx[:, t] = d_gi @ w_ih
        dh = dh_prev + d_gh @ w_hh
    return dx, grads


# --- the towers -------------------------------------------------------------------


def gru_layer_count(params: Params) -> int:
    """How many GRU layers the parameter dict holds (gru.weight_ih_l0, _l1, ...)."""
    return sum(1 for name in params if name.startswith("gru.weight_ih_l"))


def _gru_weights(params: Params, layer: int) -> tuple[np.ndarray, ...]:
    return tuple(
        np.asarray(params[f"gru.{kind}_l{layer}"], dtype=np.float64)
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )


def _project(params: Params, features: np.ndarray) -> np.ndarray:
    if "proj.weight" not in params:
        return features
    weight = np.asarray(params["proj.weight"], dtype=np.float64)
    bias = np.asarray(params["proj.bias"], dtype=np.float64)
    return features @ weight.T + bias


def _project_backward(
    params: Params, features: np.ndarray, dy: np.ndarray, grads: dict[str, np.ndarray]
) -> np.ndarray:
    if "proj.weight" not in params:
        return dy
    grads["proj.weight"] = dy.T @ features
    grads["proj.bias"] = dy.sum(axis=0)
    return dy @ np.asarray(params["proj.weight"], dtype=np.float64)


RESIDUALS = ("none", "last")


def gru_tower_forward(
    params: Params, contexts: np.ndarray, lengths: np.ndarray, residual: str = "none"
) -> tuple[np.ndarray, dict]:
    """contexts (B, T, D), lengths (B,) -> unit query vectors (B, D), cache.

    residual "last": q = normalize(x_last + proj(h_last)), x_last (B, D) the
    sequence's last real context vector (position lengths[i] - 1).
    """
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual {residual!r}; one of {RESIDUALS}")
    rows = np.arange(len(lengths))
    layer_input = np.asarray(contexts, dtype=np.float64)
    layer_caches = []
    for layer in range(gru_layer_count(params)):
        layer_input, cache = gru_layer_forward(layer_input, lengths, *_gru_weights(params, layer))
        layer_caches.append(cache)
    h_last = layer_input[rows, lengths - 1]
    y = _project(params, h_last)
    if residual == "last":
        y = y + np.asarray(contexts, dtype=np.float64)[rows, lengths - 1]  # a constant: no grad
    q, norm = normalize(y)
    steps = contexts.shape[1]
    return q, {"layers": layer_caches, "h_last": h_last, "q": q, "norm": norm, "steps": steps}


def gru_tower_backward(
    params: Params, lengths: np.ndarray, cache: dict, dq: np.ndarray
) -> dict[str, np.ndarray]:
    """dL/dq (B, D) -> dL/d(every parameter), by torch name."""
    grads: dict[str, np.ndarray] = {}
    dy = normalize_backward(dq, cache["q"], cache["norm"])
    dh_last = _project_backward(params, cache["h_last"], dy, grads)
    d_outputs = np.zeros((len(lengths), cache["steps"], dh_last.shape[1]))
    d_outputs[np.arange(len(lengths)), lengths - 1] = dh_last
    for layer in reversed(range(len(cache["layers"]))):
        w_ih, w_hh, _, _ = _gru_weights(params, layer)
        d_outputs, layer_grads = gru_layer_backward(d_outputs, cache["layers"][layer], w_ih, w_hh)
        grads[f"gru.weight_ih_l{layer}"] = layer_grads["w_ih"]
        grads[f"gru.weight_hh_l{layer}"] = layer_grads["w_hh"]
        grads[f"gru.bias_ih_l{layer}"] = layer_grads["b_ih"]
        grads[f"gru.bias_hh_l{layer}"] = layer_grads["b_hh"]
    return grads


def meanpool_tower_forward(
    params: Params, contexts: np.ndarray, lengths: np.ndarray, residual: str = "none"
) -> tuple[np.ndarray, dict]:
    """q = normalize(proj(mean of x[:length])); no proj.* parameters -> q = normalize(mean).

    The mean-pool tower has no residual option (it already starts at the mean).
    """
    if residual != "none":
        raise ValueError(f"the meanpool tower has no residual option, got {residual!r}")
    x = np.asarray(contexts, dtype=np.float64)
    valid = (np.arange(x.shape[1])[None, :] < lengths[:, None])[:, :, None]
    mean = np.where(valid, x, 0.0).sum(axis=1) / lengths[:, None]
    q, norm = normalize(_project(params, mean))
    return q, {"mean": mean, "q": q, "norm": norm}


def meanpool_tower_backward(
    params: Params, lengths: np.ndarray, cache: dict, dq: np.ndarray
) -> dict[str, np.ndarray]:
    """dL/dq (B, D) -> gradients of proj.weight and proj.bias (none without a projection)."""
    grads: dict[str, np.ndarray] = {}
    dy = normalize_backward(dq, cache["q"], cache["norm"])
    _project_backward(params, cache["mean"], dy, grads)
    return grads


TOWERS = {
    "gru": (gru_tower_forward, gru_tower_backward),
    "meanpool": (meanpool_tower_forward, meanpool_tower_backward),
}

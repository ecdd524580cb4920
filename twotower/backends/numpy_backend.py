"""The `numpy` engine: float32 GRU / mean-pool towers, InfoNCE, clip and AdamW in NumPy.

It is the last-resort fallback, so it is built for real training, not as a
second reference: tensors are time-major (T, B, .), the input projections of
all time steps are one GEMM, and so are the weight gradients of all time
steps in the backward pass; only the recurrence itself loops over time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from twotower.backends.bank_softmax import full_softmax
from twotower.backends.base import StepSettings, join_state, split_state
from twotower.batch import Batch, StepStats, candidate_blocks, full_bank_seen
from twotower.towers import TowerSpec

NORM_EPS = 1e-12


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """In-place logistic function via tanh (never overflows)."""
    np.multiply(x, 0.5, out=x)
    np.tanh(x, out=x)
    np.multiply(x, 0.5, out=x)
    np.add(x, 0.5, out=x)
    return x


def _scores(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """q (B, D) . candidates (n, D) shared or (B, n, D) per query -> scores (B, n)."""
    if vectors.ndim == 3:
        return np.matmul(vectors, q[:, :, None])[:, :, 0]
    return q @ vectors.T


def _weighted(probs: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """sum_c probs[i, c] * candidate c of query i: probs (B, n), vectors as in `_scores`."""
    if vectors.ndim == 3:
        return np.matmul(probs[:, None, :], vectors)[:, 0]
    return probs @ vectors


class _GRULayerCache:
    """What the backward pass of one layer needs; arrays are time-major."""

    def __init__(self, inputs: np.ndarray, states: np.ndarray, gates: np.ndarray, gh_n: np.ndarray):
        self.inputs = inputs  # (T, B, In)
        self.states = states  # (T + 1, B, H), states[0] = h0 = 0
        self.gates = gates  # (T, B, 3H): r, z, n after their nonlinearities
        self.gh_n = gh_n  # (T, B, H): W_hn h + b_hn


class NumpyBackend:
    """Float32 NumPy engine. See `twotower.backends.base.Backend` for the protocol."""

    name = "numpy"

    def __init__(self, spec: TowerSpec, settings: StepSettings, params: Mapping[str, np.ndarray]):
        self.spec = spec
        self.settings = settings
        self.load_state(params)

    # --- state --------------------------------------------------------------------

    def load_state(self, state: Mapping[str, Any]) -> None:
        params, moments, step = split_state(self.spec, state)
        self.params = {name: np.array(p, dtype=np.float32) for name, p in params.items()}
        if moments is None:
            moments = {
                name: (np.zeros_like(p), np.zeros_like(p)) for name, p in self.params.items()
            }
        self.exp_avg = {name: np.array(m[0]) for name, m in moments.items()}
        self.exp_avg_sq = {name: np.array(m[1]) for name, m in moments.items()}
        self.steps_taken = step

    def state(self) -> dict[str, np.ndarray]:
        moments = {name: (self.exp_avg[name], self.exp_avg_sq[name]) for name in self.params}
        return join_state(self.params, moments, self.steps_taken)

    # --- towers -----------------------------------------------------------------------

    def _gru_forward(
        self, contexts: np.ndarray, lengths: np.ndarray, keep: bool
    ) -> tuple[np.ndarray, list[_GRULayerCache], np.ndarray]:
        """-> final hidden state (B, H), per-layer caches (if keep), active mask (T, B, 1)."""
        steps, hidden = contexts.shape[1], self.spec.hidden
        active = (np.arange(steps)[:, None] < lengths[None, :])[:, :, None]
        x = np.where(active, contexts.transpose(1, 0, 2), np.float32(0))  # padding is never read
        caches = []
        for layer in range(self.spec.layers):
            w_ih = self.params[f"gru.weight_ih_l{layer}"]
            w_hh = self.params[f"gru.weight_hh_l{layer}"]
            b_hh = self.params[f"gru.bias_hh_l{layer}"]
            # every time step's input projection in one GEMM: (T*B, In) @ (In, 3H)
            gi = (x.reshape(-1, x.shape[2]) @ w_ih.T).reshape(steps, len(lengths), 3 * hidden)
            gi += self.params[f"gru.bias_ih_l{layer}"]
            states = np.zeros((steps + 1, len(lengths), hidden), dtype=np.float32)
            gh_n = np.empty((steps, len(lengths), hidden), dtype=np.float32)
            for t in range(steps):
                h = states[t]
                gh = h @ w_hh.T
                gh += b_hh
                gates = gi[t]  # overwritten in place with r, z, n
                rz = gates[:, : 2 * hidden]
                rz += gh[:, : 2 * hidden]
                _sigmoid(rz)
                r, z, n = gates[:, :hidden], gates[:, hidden : 2 * hidden], gates[:, 2 * hidden :]
                gh_n[t] = gh[:, 2 * hidden :]
                n += r * gh_n[t]
                np.tanh(n, out=n)
                h_new = h - n
                h_new *= z
                h_new += n
                states[t + 1] = np.where(active[t], h_new, h)
            if keep:
                caches.append(_GRULayerCache(x, states, gi, gh_n))
            x = states[1:]
        return x[-1], caches, active

    def _gru_backward(
        self, caches: list[_GRULayerCache], active: np.ndarray, dh_last: np.ndarray
    ) -> dict[str, np.ndarray]:
        hidden = self.spec.hidden
        grads: dict[str, np.ndarray] = {}
        d_outputs: np.ndarray | None = None  # (T, B, H) from the layer above; None on top
        for layer in reversed(range(len(caches))):
            cache = caches[layer]
            w_ih = self.params[f"gru.weight_ih_l{layer}"]
            w_hh = self.params[f"gru.weight_hh_l{layer}"]
            steps = cache.gates.shape[0]
            d_gi = np.empty_like(cache.gates)  # (T, B, 3H)
            d_gh = np.empty_like(cache.gates)
            dh = dh_last.copy() if d_outputs is None else np.zeros_like(dh_last)
            for t in reversed(range(steps)):
                if d_outputs is not None:
                    dh += d_outputs[t]
                h_prev = cache.states[t]
                gates = cache.gates[t]
                r, z, n = gates[:, :hidden], gates[:, hidden : 2 * hidden], gates[:, 2 * hidden :]
                dh_new = np.where(active[t], dh, np.float32(0))
                dn_pre = dh_new * (1 - z) * (1 - n * n)
                dz_pre = dh_new * (h_prev - n) * z * (1 - z)
                d_gh[t, :, :hidden] = dn_pre * cache.gh_n[t] * r * (1 - r)
                d_gh[t, :, hidden : 2 * hidden] = dz_pre
                d_gh[t, :, 2 * hidden :] = dn_pre * r
                d_gi[t, :, 2 * hidden :] = dn_pre
                # h' = n + z (h - n) passes z * dh back; a frozen (padded) step passes all of dh
                dh = np.where(active[t], dh * z, dh)
                dh += d_gh[t] @ w_hh
            d_gi[:, :, : 2 * hidden] = d_gh[:, :, : 2 * hidden]
            flat_gi = d_gi.reshape(-1, 3 * hidden)
            flat_gh = d_gh.reshape(-1, 3 * hidden)
            # weight gradients of all time steps at once
            grads[f"gru.weight_ih_l{layer}"] = flat_gi.T @ cache.inputs.reshape(len(flat_gi), -1)
            grads[f"gru.weight_hh_l{layer}"] = flat_gh.T @ cache.states[:-1].reshape(-1, hidden)
            grads[f"gru.bias_ih_l{layer}"] = flat_gi.sum(axis=0)
            grads[f"gru.bias_hh_l{layer}"] = flat_gh.sum(axis=0)
            if layer > 0:
                d_outputs = (flat_gi @ w_ih).reshape(steps, -1, w_ih.shape[1])
        return grads

    def _pooled(
        self, contexts: np.ndarray, lengths: np.ndarray, keep: bool
    ) -> tuple[np.ndarray, Any]:
        """The tower's features before projection: GRU final state or masked mean."""
        if self.spec.kind == "gru":
            h_last, caches, active = self._gru_forward(contexts, lengths, keep)
            return h_last, (caches, active)
        valid = (np.arange(contexts.shape[1])[None, :] < lengths[:, None])[:, :, None]
        summed = np.where(valid, contexts, np.float32(0)).sum(axis=1)
        return summed / lengths[:, None].astype(np.float32), None

    def _forward(
        self, contexts: np.ndarray, lengths: np.ndarray, keep: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """-> q (B, D), norm (B, 1), pooled features, tower cache."""
        contexts = np.asarray(contexts, dtype=np.float32)
        lengths = np.asarray(lengths, dtype=np.int64)
        features, cache = self._pooled(contexts, lengths, keep)
        y = features
        if "proj.weight" in self.params:
            y = features @ self.params["proj.weight"].T
            y += self.params["proj.bias"]
        if self.spec.residual == "last":
            y += contexts[np.arange(len(lengths)), lengths - 1]
        norm = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.float32(NORM_EPS))
        return y / norm, norm, features, cache

    def encode(self, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        q, _, _, _ = self._forward(contexts, lengths, keep=False)
        return q

    # --- loss --------------------------------------------------------------------------

    def _infonce(self, q: np.ndarray, batch: Batch) -> tuple[float, np.ndarray]:
        """Masked InfoNCE (over the batch's `candidate_blocks`, or every bank row with
        `batch.full_softmax`). q (B, D) -> (loss, dL/dq (B, D))."""
        if batch.full_softmax:
            assert batch.bank is not None, "the full softmax needs the bank"
            positives = np.asarray(batch.positive_ids, dtype=np.int64)
            seen = full_bank_seen(batch)
            return full_softmax(q, batch.bank, positives, seen, self.settings.temperature, len(q))
        tau = np.float32(self.settings.temperature)
        blocks = candidate_blocks(batch)
        vectors = [np.asarray(block.vectors, dtype=np.float32) for block in blocks]
        logits = np.concatenate([_scores(q, v) for v in vectors], axis=1)  # (B, C)
        logits /= tau
        bounds = np.cumsum([0] + [block.size for block in blocks])
        for block, start, stop in zip(blocks, bounds[:-1], bounds[1:], strict=True):
            if block.correction is not None:
                logits[:, start:stop] += block.correction.astype(np.float32)
        logits[np.concatenate([block.masked for block in blocks], axis=1)] = -np.inf
        top = logits.max(axis=1, keepdims=True)
        probs = np.exp(logits - top)
        total = probs.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(total[:, 0]) + top[:, 0] - np.diagonal(logits)))
        probs /= total
        dq = _weighted(probs[:, : bounds[1]], vectors[0])
        for vecs, start, stop in zip(vectors[1:], bounds[1:-1], bounds[2:], strict=True):
            dq += _weighted(probs[:, start:stop], vecs)
        dq -= vectors[0]  # the in-batch block: row i is query i's positive
        dq /= tau * len(q)
        return loss, dq

    def loss_and_grads(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        lengths = np.asarray(batch.lengths, dtype=np.int64)
        q, norm, features, cache = self._forward(batch.contexts, lengths, keep=True)
        loss, dq = self._infonce(q, batch)
        dy = dq - q * np.sum(q * dq, axis=1, keepdims=True)
        dy = np.where(norm <= NORM_EPS, dq, dy) / norm
        grads: dict[str, np.ndarray] = {}
        if "proj.weight" in self.params:
            grads["proj.weight"] = dy.T @ features
            grads["proj.bias"] = dy.sum(axis=0)
            dy = dy @ self.params["proj.weight"]
        if self.spec.kind == "gru":
            caches, active = cache
            grads.update(self._gru_backward(caches, active, dy))
        return loss, grads

    # --- update ------------------------------------------------------------------------

    def step(self, batch: Batch, lr: float | None = None) -> StepStats:
        loss, grads = self.loss_and_grads(batch)
        norm = float(np.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values())))
        if not (np.isfinite(loss) and np.isfinite(norm)):
            return StepStats(loss=loss, grad_norm=norm, applied=False)
        s = self.settings
        lr = s.lr if lr is None else lr
        clip = np.float32(min(1.0, s.max_grad_norm / (norm + 1e-6)))
        self.steps_taken += 1
        step_size = lr / (1 - s.beta1**self.steps_taken)
        bias_correction2_sqrt = np.sqrt(1 - s.beta2**self.steps_taken)
        for name, p in self.params.items():
            g = grads[name]
            g *= clip
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            p *= np.float32(1 - lr * s.weight_decay)
            exp_avg *= np.float32(s.beta1)
            exp_avg += np.float32(1 - s.beta1) * g
            exp_avg_sq *= np.float32(s.beta2)
            exp_avg_sq += np.float32(1 - s.beta2) * g * g
            denom = np.sqrt(exp_avg_sq)
            denom /= np.float32(bias_correction2_sqrt)
            denom += np.float32(s.eps)
            p -= np.float32(step_size) * exp_avg / denom
        return StepStats(loss=loss, grad_norm=norm, applied=True)

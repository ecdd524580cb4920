"""The float64 reference is right: finite differences, and torch autograd written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference
from tests.agreement import assert_agrees, assert_differs
from tests.batches import make_batch, perturbed
from tests.reference_towers import DIM, TOWERS, random_params, torch_queries
from twotower import Batch


@pytest.mark.parametrize("seen", [False, True], ids=["all-candidates", "seen-items-masked"])
@pytest.mark.parametrize("tower", TOWERS)
def test_gradients_match_central_finite_differences(tower: str, seen: bool) -> None:
    spec = TOWERS[tower]
    batch = make_batch(
        np.random.default_rng(1), batch=4, steps=4, dim=DIM, hard=2, queue=3, context_ids=seen
    )
    params = random_params(spec, 2)
    temperature = 0.5  # keeps the loss smooth enough for finite differences at h = 1e-6

    def loss_and_grads(params: dict) -> tuple[float, dict]:
        return reference.loss_and_grads(spec.kind, params, batch, temperature, spec.residual)

    _, grads = loss_and_grads(params)
    assert set(grads) == set(params)
    h = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            shifted = dict(params)
            for sign in (1, -1):
                moved = value.copy()
                moved[index] += sign * h
                shifted[name] = moved
                loss, _ = loss_and_grads(shifted)
                numeric[index] += sign * loss / (2 * h)
        relative = np.linalg.norm(grads[name] - numeric) / np.linalg.norm(numeric)
        assert relative < 1e-6, f"{tower} {name}: relative error {relative:.2e}"


def torch_loss(q: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """InfoNCE built candidate by candidate, exactly as docs/DESIGN.md words it."""
    losses = []
    size = len(batch.positive_ids)
    for i in range(size):
        p_i = int(batch.positive_ids[i])
        seen = set() if batch.context_ids is None else {int(c) for c in batch.context_ids[i]}
        entries = [(batch.positive_vecs[i], p_i, True)]
        entries += [
            (batch.positive_vecs[j], int(batch.positive_ids[j]), False)
            for j in range(size)
            if j != i
        ]
        entries += [
            (v, int(c), False) for v, c in zip(batch.hard_vecs[i], batch.hard_ids[i], strict=True)
        ]
        entries += [
            (v, int(c), False) for v, c in zip(batch.queue_vecs, batch.queue_ids, strict=True)
        ]
        scores = [
            q[i] @ torch.tensor(vec, dtype=torch.float64) / temperature
            for vec, cid, first in entries
            if first or (cid != p_i and cid != -1 and cid not in seen)
        ]
        losses.append(torch.logsumexp(torch.stack(scores), dim=0) - scores[0])
    return torch.stack(losses).mean()


CASES = {
    "hard-and-queue": dict(hard=3, queue=7),
    "no-hard": dict(hard=0, queue=5),
    "no-queue": dict(hard=2, queue=0),
    "in-batch-only": dict(hard=0, queue=0),
    "seen-items-masked": dict(hard=3, queue=7, context_ids=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tower", TOWERS)
def test_reference_matches_torch_autograd(tower: str, case: str) -> None:
    spec = TOWERS[tower]
    batch = make_batch(np.random.default_rng(7), batch=6, steps=5, dim=DIM, **CASES[case])
    params = random_params(spec, 3)
    q, leaves = torch_queries(spec, params, batch)
    expected_loss = torch_loss(q, batch, 0.05)
    expected_loss.backward()

    loss, grads = reference.loss_and_grads(spec.kind, params, batch, 0.05, spec.residual)
    assert_agrees(np.array(loss), expected_loss.detach().numpy(), np.float64, "loss")
    assert_agrees(
        reference.encode(spec.kind, params, batch.contexts, batch.lengths, spec.residual),
        q.detach().numpy(),
        np.float64,
        "encode",
    )
    for name, leaf in leaves.items():
        assert_agrees(grads[name], leaf.grad.numpy(), np.float64, name)

    moved_loss, _ = reference.loss_and_grads(
        spec.kind, params, perturbed(batch), 0.05, spec.residual
    )
    assert_differs(
        np.array(moved_loss), expected_loss.detach().numpy(), np.float64, "perturbed loss"
    )


def test_masked_candidates_do_not_count() -> None:
    """A duplicate positive, a hard negative equal to the positive and -1 slots drop out."""
    rng = np.random.default_rng(11)
    batch = make_batch(rng, batch=4, steps=3, dim=DIM, hard=2, queue=3, awkward_ids=False)
    params = random_params(TOWERS["meanpool"], 5)
    clean_loss, _ = reference.loss_and_grads("meanpool", params, batch, 0.05)
    noisy = Batch(**batch.__dict__)
    noisy.hard_ids = np.concatenate(
        [batch.hard_ids, batch.positive_ids[:, None], -np.ones((4, 1), np.int64)], 1
    )
    noisy.hard_vecs = np.concatenate(
        [
            batch.hard_vecs,
            batch.positive_vecs[:, None],
            rng.standard_normal((4, 1, DIM)).astype(np.float32),
        ],
        1,
    )
    noisy.queue_ids = np.concatenate([batch.queue_ids, [-1]])
    noisy.queue_vecs = np.concatenate(
        [batch.queue_vecs, rng.standard_normal((1, DIM)).astype(np.float32)]
    )
    noisy_loss, _ = reference.loss_and_grads("meanpool", params, noisy, 0.05)
    assert noisy_loss == pytest.approx(clean_loss, rel=1e-12)

    counted = Batch(**noisy.__dict__)  # the same slot with a real, different id must count
    counted.queue_ids = np.concatenate([batch.queue_ids, [int(batch.positive_ids.max()) + 1]])
    counted.queue_vecs = np.concatenate([batch.queue_vecs, batch.positive_vecs[:1]])
    counted_loss, _ = reference.loss_and_grads("meanpool", params, counted, 0.05)
    assert counted_loss != pytest.approx(clean_loss, rel=1e-6)


def test_adamw_and_clipping_match_torch() -> None:
    rng = np.random.default_rng(4)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    weights = {name: torch.nn.Parameter(torch.tensor(v)) for name, v in params.items()}
    optimizer = torch.optim.AdamW(weights.values(), lr=1e-2, weight_decay=0.1)
    exp_avg = {name: np.zeros_like(v) for name, v in params.items()}
    exp_avg_sq = {name: np.zeros_like(v) for name, v in params.items()}
    step = 0
    for scale in (0.1, 10.0, 3.0):  # the second and third gradients are clipped
        grads = {name: scale * rng.standard_normal(v.shape) for name, v in params.items()}
        for name, w in weights.items():
            w.grad = torch.tensor(grads[name])
        torch_norm = torch.nn.utils.clip_grad_norm_(weights.values(), 1.0)
        optimizer.step()
        clipped, norm = reference.clip_grad_norm(grads, 1.0)
        assert norm == pytest.approx(float(torch_norm), rel=1e-12)
        params, exp_avg, exp_avg_sq, step = reference.adamw(
            params, clipped, exp_avg, exp_avg_sq, step, lr=1e-2, weight_decay=0.1
        )
    for name, w in weights.items():
        assert_agrees(params[name], w.detach().numpy(), np.float64, name)

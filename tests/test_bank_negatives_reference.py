"""The reference's negatives from the whole bank are right: full softmax, sampled softmax and
logQ against float64 torch autograd over logits written out here, chunking, masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference
from reference.bank import full_softmax
from tests.agreement import assert_agrees, assert_differs
from tests.batches import make_batch
from tests.reference_towers import DIM, TOWERS, random_params, torch_queries
from twotower import Batch


def torch_candidate_loss(q: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """InfoNCE as one (B, B + K + Q + S) logit matrix: in-batch minus logQ, hard, queue minus
    logQ, sampled plus log(M / S); masked entries at -inf; cross entropy on the diagonal."""
    size = len(batch.positive_ids)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    pos, hard, queue = t(batch.positive_vecs), t(batch.hard_vecs), t(batch.queue_vecs)
    sampled_ids = np.zeros(0, np.int64) if batch.sampled_ids is None else batch.sampled_ids
    sampled = t(batch.sampled_vecs) if batch.sampled_ids is not None else pos[:0]
    parts = [q @ pos.T, torch.einsum("bd,bkd->bk", q, hard), q @ queue.T, q @ sampled.T]
    logits = torch.cat(parts, dim=1) / temperature
    n_in, k, n_q = size, hard.shape[1], queue.shape[0]
    if batch.in_batch_logq is not None:
        logits[:, :n_in] -= t(batch.in_batch_logq)[None, :]
        logits[:, n_in + k : n_in + k + n_q] -= t(batch.queue_logq)[None, :]
    if len(sampled_ids):
        logits[:, n_in + k + n_q :] += np.log(len(batch.bank) / len(sampled_ids))
    ids = [
        np.concatenate([batch.positive_ids, batch.hard_ids[i], batch.queue_ids, sampled_ids])
        for i in range(size)
    ]
    for i in range(size):
        seen = set() if batch.context_ids is None else set(batch.context_ids[i].tolist()) - {-1}
        for c, cid in enumerate(ids[i].tolist()):
            if c != i and (cid == batch.positive_ids[i] or cid == -1 or cid in seen):
                logits[i, c] = -torch.inf
    return F.cross_entropy(logits, torch.arange(size))


def torch_full_loss(q: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """The whole (B, M) score matrix at once, seen items at -inf, cross entropy on p_i."""
    logits = q @ torch.tensor(np.asarray(batch.bank), dtype=torch.float64).T / temperature
    if batch.context_ids is not None:
        for i, row in enumerate(batch.context_ids.tolist()):
            for cid in row:
                if cid >= 0 and cid != batch.positive_ids[i]:
                    logits[i, cid] = -torch.inf
    return F.cross_entropy(logits, torch.tensor(batch.positive_ids))


CASES = {
    "full": dict(full_softmax=True),
    "full-seen-masked": dict(full_softmax=True, context_ids=True),
    "sampled": dict(sampled=9),
    "sampled-seen-masked": dict(sampled=9, context_ids=True),
    "logq": dict(logq=True),
    "sampled-logq-seen-masked": dict(sampled=9, logq=True, context_ids=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tower", ["gru-2", "gru-2-residual", "meanpool"])
def test_reference_matches_torch_autograd(tower: str, case: str) -> None:
    spec = TOWERS[tower]
    batch = make_batch(np.random.default_rng(7), batch=6, steps=5, dim=DIM, **CASES[case])
    params = random_params(spec, 3)
    q, leaves = torch_queries(spec, params, batch)
    written = torch_full_loss if batch.full_softmax else torch_candidate_loss
    expected = written(q, batch, 0.05)
    expected.backward()

    loss, grads = reference.loss_and_grads(spec.kind, params, batch, 0.05, spec.residual)
    assert_agrees(np.array(loss), expected.detach().numpy(), np.float64, "loss")
    for name, leaf in leaves.items():
        assert_agrees(grads[name], leaf.grad.numpy(), np.float64, name)

    # negative control: the same batch without the option gives other numbers
    plain = Batch(
        **{
            **batch.__dict__,
            "full_softmax": False,
            "sampled_ids": None,
            "sampled_vecs": None,
            "in_batch_logq": None,
            "queue_logq": None,
        }
    )
    plain_loss, _ = reference.loss_and_grads(spec.kind, params, plain, 0.05, spec.residual)
    assert_differs(np.array(plain_loss), expected.detach().numpy(), np.float64, "without it")


@pytest.mark.parametrize("chunk_rows", [1, 7, 40, 1000])
def test_full_softmax_does_not_depend_on_the_chunk(chunk_rows: int) -> None:
    batch = make_batch(np.random.default_rng(3), dim=DIM, full_softmax=True, context_ids=True)
    q = np.random.default_rng(4).standard_normal((len(batch.positive_ids), DIM))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    expected = torch_full_loss(torch.tensor(q, requires_grad=True), batch, 0.05)
    loss, dq = full_softmax(q, batch, 0.05, chunk_rows=chunk_rows)
    assert_agrees(np.array(loss), expected.detach().numpy(), np.float64, "loss")
    dq_expected = torch.autograd.grad(
        torch_full_loss(qt := torch.tensor(q, requires_grad=True), batch, 0.05), qt
    )[0]
    assert_agrees(dq, dq_expected.numpy(), np.float64, "dL/dq")


def one_query(batch: Batch, i: int) -> Batch:
    """Query i of `batch` alone (its candidates and masks unchanged)."""
    rows = slice(i, i + 1)
    per_query = ("contexts", "lengths", "positive_ids", "positive_vecs", "hard_ids", "hard_vecs")
    return Batch(
        **{
            **batch.__dict__,
            **{name: getattr(batch, name)[rows] for name in (*per_query, "context_ids")},
        }
    )


def test_a_masked_bank_row_never_contributes() -> None:
    """Moving the vector of a row the query has seen changes nothing; moving another does."""
    batch = make_batch(np.random.default_rng(5), dim=DIM, full_softmax=True, context_ids=True)
    single = one_query(batch, 1)
    q = np.random.default_rng(6).standard_normal((1, DIM))
    q /= np.linalg.norm(q)
    positive = int(single.positive_ids[0])
    row = int(np.setdiff1d(single.context_ids[0], [-1, positive])[0])
    loss, dq = full_softmax(q, single, 0.05)
    moved = single.bank.copy()
    moved[row] = q[0]  # would be the top candidate if it counted
    moved_loss, moved_dq = full_softmax(q, Batch(**{**single.__dict__, "bank": moved}), 0.05)
    assert moved_loss == loss
    np.testing.assert_array_equal(moved_dq, dq)
    # negative control: the same vector at a row the query has not seen counts
    other = int(np.setdiff1d(np.arange(len(moved)), [*single.context_ids[0], positive])[0])
    moved[other] = q[0]
    counted_loss, _ = full_softmax(q, Batch(**{**single.__dict__, "bank": moved}), 0.05)
    assert counted_loss > loss + 1e-3

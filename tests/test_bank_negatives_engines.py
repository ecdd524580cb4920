"""Every available engine computes the reference's numbers with negatives from the whole bank:
the full softmax, sampled bank rows and logQ; loss, every gradient and five AdamW steps."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from tests.agreement import assert_agrees, assert_differs
from tests.batches import make_batch
from tests.engines import (
    DIM,
    ENGINE_IDS,
    ENGINES,
    assert_matches_reference,
    engine,
    params_of,
)
from twotower import Batch
from twotower.backends import bank_softmax
from twotower.backends.base import OPT_EXP_AVG, OPT_EXP_AVG_SQ

CASES = {
    "full": dict(full_softmax=True),
    "full-seen-masked": dict(full_softmax=True, context_ids=True),
    "sampled-seen-masked": dict(sampled=12, context_ids=True),
    "logq": dict(logq=True),
    "sampled-logq-hard-queue": dict(sampled=12, logq=True, hard=3, queue=9, context_ids=True),
}


def without_bank_options(batch: Batch) -> Batch:
    """The negative control: the same batch with every bank option off."""
    off = dict(full_softmax=False, sampled_ids=None, sampled_vecs=None)
    return Batch(**{**batch.__dict__, **off, "in_batch_logq": None, "queue_logq": None})


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 rows over the tests' 40-row banks, so the running logsumexp crosses
    chunk boundaries (the real chunk is 32 MiB of rows)."""
    monkeypatch.setattr(bank_softmax, "CHUNK_BYTES", 7 * 4 * DIM)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tower", ["gru-2", "meanpool"])
@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_loss_and_gradients_match_reference(name: str, opts: dict, tower: str, case: str) -> None:
    backend = engine(name, opts, tower)
    kind = "meanpool" if tower == "meanpool" else "gru"
    batch = make_batch(np.random.default_rng(5), batch=8, steps=6, dim=DIM, **CASES[case])
    expected_loss, expected_grads = assert_matches_reference(backend, kind, batch)

    # negative control: the engine without the option must not meet the reference with it
    plain_loss, plain_grads = backend.loss_and_grads(without_bank_options(batch))
    assert_differs(np.float32(plain_loss), np.array(expected_loss), np.float32, "without it")
    first = next(iter(expected_grads))
    assert_differs(plain_grads[first], expected_grads[first], np.float32, f"without it: {first}")


@pytest.mark.parametrize("case", ["full-seen-masked", "sampled-logq-hard-queue"])
@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_five_steps_match_reference(name: str, opts: dict, case: str) -> None:
    settings = dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5)
    backend = engine(name, opts, "gru-1", **settings)
    params = {k: v.astype(np.float64) for k, v in params_of(backend).items()}
    opt: dict = {}
    rng = np.random.default_rng(9)
    for _ in range(5):
        batch = make_batch(rng, batch=8, steps=6, dim=DIM, **CASES[case])
        stats = backend.step(batch)
        params, opt, loss, norm = reference.train_step("gru", params, opt, batch, 0.05, **settings)
        assert_agrees(np.float32(stats.loss), np.array(loss), np.float32, "loss")
        assert_agrees(np.float32(stats.grad_norm), np.array(norm), np.float32, "grad norm")
    state = backend.state()
    adam_atol = 5 * 1e-3 * settings["lr"]  # as in test_backends: AdamW near-zero gradients
    for param_name, value in params.items():
        assert_agrees(state[param_name], value, np.float32, param_name, extra_atol=adam_atol)
        # the parameters may differ by adam_atol after a step, and the next gradient with them:
        # over the full softmax (1/tau = 20, every row a candidate) moments were seen 5e-6 of
        # their largest element off (numpy and torch's masked GRU, in opposite directions)
        for key, expected in ((OPT_EXP_AVG, opt["exp_avg"]), (OPT_EXP_AVG_SQ, opt["exp_avg_sq"])):
            moment = expected[param_name]
            allowance = 2e-5 * float(np.max(np.abs(moment)))
            assert_agrees(state[key + param_name], moment, np.float32, key, extra_atol=allowance)
    fresh = params_of(engine(name, opts, "gru-1", **settings))
    first = next(iter(params))
    assert_differs(fresh[first], params[first], np.float32, "fresh parameters")


@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_a_masked_bank_row_never_contributes(name: str, opts: dict) -> None:
    """A row every query has seen (and none has as positive) moved to where the queries
    point changes nothing in the full softmax; the same move of an unseen row does."""
    batch = make_batch(np.random.default_rng(4), batch=6, dim=DIM, full_softmax=True)
    free = np.setdiff1d(np.arange(len(batch.bank)), batch.positive_ids)
    seen_row, unseen_row = int(free[0]), int(free[1])
    context_ids = np.full((6, batch.contexts.shape[1]), -1, dtype=np.int64)
    context_ids[:, 0] = seen_row
    batch = Batch(**{**batch.__dict__, "context_ids": context_ids})
    backend = engine(name, opts, "meanpool")
    loss, grads = backend.loss_and_grads(batch)
    q = backend.encode(batch.contexts, batch.lengths).mean(axis=0)
    for row in (seen_row, unseen_row):
        moved = batch.bank.copy()
        moved[row] = q / np.linalg.norm(q)
        moved_loss, moved_grads = backend.loss_and_grads(Batch(**{**batch.__dict__, "bank": moved}))
        if row == seen_row:
            assert moved_loss == loss
            for param_name, grad in grads.items():
                np.testing.assert_array_equal(moved_grads[param_name], grad, err_msg=param_name)
        else:
            assert moved_loss > loss + 1e-3, "negative control: an unseen row counts"


def test_the_cpu_bank_is_the_memory_map_itself(tmp_path) -> None:
    """torch-cpu reads a read-only memory-mapped bank in place (no copy), and the numbers
    are the reference's."""
    if "torch-cpu" not in [name for name, _ in ENGINES]:
        pytest.skip("torch is not installed")
    import torch

    from twotower.backends.torch_bank import DeviceBank

    batch = make_batch(np.random.default_rng(6), batch=8, dim=DIM, full_softmax=True)
    np.save(tmp_path / "bank.npy", batch.bank)
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    bank = DeviceBank(mapped, torch.device("cpu"))
    assert bank.rows.data_ptr() == mapped.ctypes.data
    batch = Batch(**{**batch.__dict__, "bank": mapped})
    backend = engine("torch-cpu", {}, "gru-1")
    loss, _ = backend.loss_and_grads(batch)
    expected, _ = reference.loss_and_grads("gru", params_of(backend), batch, 0.05)
    assert_agrees(np.float32(loss), np.array(expected), np.float32, "loss")
    assert backend.bank is not None and backend.bank.rows.data_ptr() == mapped.ctypes.data

"""Every available engine computes the reference's numbers: loss, gradients, encode, five steps."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import reference
from tests.agreement import assert_agrees, assert_differs
from tests.batches import make_batch, perturbed
from tests.engines import (
    DIM,
    ENGINE_IDS,
    ENGINES,
    HIDDEN,
    TOWERS,
    assert_matches_reference,
    engine,
    params_of,
)
from twotower import backends
from twotower.backends.base import OPT_EXP_AVG, OPT_EXP_AVG_SQ, OPT_STEP
from twotower.errors import EngineUnavailable
from twotower.towers import TowerSpec, init_params


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_loss_gradients_and_encode_match_reference(name: str, opts: dict, tower: str) -> None:
    backend = engine(name, opts, tower)
    kind = TOWERS[tower]["tower"]
    batch = make_batch(np.random.default_rng(5), batch=8, steps=6, dim=DIM, hard=3, queue=16)
    params = params_of(backend)
    expected_loss, expected_grads = assert_matches_reference(backend, kind, batch)

    q = backend.encode(batch.contexts, batch.lengths)
    assert_agrees(
        q, reference.encode(kind, params, batch.contexts, batch.lengths), np.float32, "encode"
    )
    assert_agrees(np.linalg.norm(q, axis=1), np.ones(len(q)), np.float32, "unit norm")

    # negative control: one context value moved, the reference of the old batch must not match
    moved_loss, moved_grads = backend.loss_and_grads(perturbed(batch))
    assert_differs(np.float32(moved_loss), np.array(expected_loss), np.float32, "perturbed loss")
    first = next(iter(expected_grads))
    assert_differs(moved_grads[first], expected_grads[first], np.float32, f"perturbed {first}")


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_five_steps_match_reference(name: str, opts: dict, tower: str) -> None:
    """Five clip + AdamW steps on different batches; the norm limit makes clipping bite."""
    settings = dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5)
    backend = engine(name, opts, tower, **settings)
    kind = TOWERS[tower]["tower"]
    params = {k: v.astype(np.float64) for k, v in params_of(backend).items()}
    opt: dict = {}
    rng = np.random.default_rng(9)
    norms = []
    for _ in range(5):
        batch = make_batch(rng, batch=8, steps=6, dim=DIM, hard=2, queue=8)
        stats = backend.step(batch)
        params, opt, loss, norm = reference.train_step(kind, params, opt, batch, 0.05, **settings)
        assert stats.applied
        assert_agrees(np.float32(stats.loss), np.array(loss), np.float32, "loss")
        assert_agrees(np.float32(stats.grad_norm), np.array(norm), np.float32, "grad norm")
        norms.append(norm)
    assert max(norms) > 0.5, "clipping never engaged; the test would not cover it"

    state = backend.state()
    assert int(state[OPT_STEP]) == 5
    # AdamW divides by sqrt(v): where a gradient is nearly zero, float32 rounding can move its
    # normalised update by a fraction of lr; seen up to 1e-4 * lr per step
    adam_atol = 5 * 1e-3 * settings["lr"]
    for param_name, value in params.items():
        assert_agrees(state[param_name], value, np.float32, param_name, extra_atol=adam_atol)
        assert_agrees(state[OPT_EXP_AVG + param_name], opt["exp_avg"][param_name], np.float32, "m")
        assert_agrees(
            state[OPT_EXP_AVG_SQ + param_name], opt["exp_avg_sq"][param_name], np.float32, "v"
        )

    # negative control: the state of a run that skipped the last update must differ
    unfinished = {k: v for k, v in params_of(engine(name, opts, tower, **settings)).items()}
    assert_differs(unfinished[next(iter(params))], params[next(iter(params))], np.float32, "fresh")


@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_non_finite_loss_leaves_state_untouched(name: str, opts: dict) -> None:
    backend = engine(name, opts, "gru-1")
    batch = make_batch(np.random.default_rng(2), dim=DIM, garbage_padding=False)
    batch.contexts[0, 0, 0] = np.nan
    before = backend.state()
    stats = backend.step(batch)
    assert not stats.applied
    assert not np.isfinite(stats.loss)
    after = backend.state()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_state_moves_between_engines() -> None:
    """numpy trains three steps; torch-cpu picks up its full state and continues identically."""
    if "torch-cpu" not in backends.available():
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(12)
    batches = [make_batch(rng, batch=8, steps=6, dim=DIM) for _ in range(4)]
    source = engine("numpy", {}, "gru-2")
    for batch in batches[:3]:
        source.step(batch)
    state = source.state()

    target = engine("torch-cpu", {}, "gru-2")
    target.load_state(state)
    moved = target.state()
    for key, value in state.items():
        np.testing.assert_array_equal(moved[key], value, err_msg=key)
    loss, grads = target.loss_and_grads(batches[3])
    expected_loss, expected_grads = source.loss_and_grads(batches[3])
    assert_agrees(np.float32(loss), np.array(expected_loss), np.float32, "loss")
    for param_name, grad in grads.items():
        assert_agrees(grad, expected_grads[param_name], np.float32, param_name)
    target.step(batches[3])
    source.step(batches[3])
    for param_name, value in params_of(source).items():
        assert_agrees(params_of(target)[param_name], value, np.float32, param_name)


@pytest.mark.parametrize("name", backends.available())
def test_state_round_trip_is_exact(name: str) -> None:
    backend = engine(name, {}, "gru-1")
    batch = make_batch(np.random.default_rng(8), dim=DIM)
    backend.step(batch)
    state = backend.state()
    twin = engine(name, {}, "gru-1")
    twin.load_state(state)
    assert backend.loss_and_grads(batch)[0] == twin.loss_and_grads(batch)[0]
    backend.step(batch)
    twin.step(batch)
    for key, value in backend.state().items():
        np.testing.assert_array_equal(twin.state()[key], value, err_msg=key)


class UserTower(torch.nn.Module):
    """What a user wrote by hand: nn.GRU + nn.Linear, L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(DIM, HIDDEN, 2, batch_first=True)
        self.proj = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        _, h_n = self.gru(packed)
        return torch.nn.functional.normalize(self.proj(h_n[-1]), dim=1)


@pytest.mark.parametrize("name", backends.available())
def test_a_users_torch_state_dict_loads_as_is(name: str) -> None:
    torch.manual_seed(0)
    user = UserTower()
    backend = engine(name, {}, "gru-2")
    backend.load_state(user.state_dict())
    batch = make_batch(np.random.default_rng(1), dim=DIM, garbage_padding=False)
    with torch.no_grad():
        expected = user(torch.from_numpy(batch.contexts), torch.from_numpy(batch.lengths)).numpy()
    assert_agrees(backend.encode(batch.contexts, batch.lengths), expected, np.float32, "encode")
    assert int(backend.state()[OPT_STEP]) == 0


def test_meanpool_without_projection_is_the_normalised_mean() -> None:
    backend = backends.get("numpy", tower="meanpool", dim=DIM, hidden=DIM, proj=False)
    batch = make_batch(np.random.default_rng(3), dim=DIM)
    expected = np.stack(
        [
            row[:n].astype(np.float64).mean(0)
            for row, n in zip(batch.contexts, batch.lengths, strict=True)
        ]
    )
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert_agrees(backend.encode(batch.contexts, batch.lengths), expected, np.float32, "encode")


@pytest.mark.skipif(sys.platform != "linux", reason="MPS may exist off Linux")
def test_unavailable_backend_is_refused_with_the_reason() -> None:
    available = ", ".join(backends.available())
    with pytest.raises(EngineUnavailable) as caught:
        backends.get("torch-mps")
    reason = "MPS needs macOS on Apple silicon"
    assert (
        str(caught.value) == f"torch-mps is not available here ({reason}); available: {available}"
    )
    with pytest.raises(EngineUnavailable, match="unknown backend 'tpu'; known: numpy, torch-cpu"):
        backends.get("tpu")


# --- recipe options: residual tower, seen-item masking, the lr schedule ---------------------


def residual_engine(name: str, opts: dict, **settings) -> backends.Backend:
    """A 2-layer residual GRU engine whose proj is moved off zero (at zero the GRU gets no
    gradient, and the agreement would cover only proj)."""
    backend = backends.get(name, "gru", DIM, HIDDEN, 2, residual="last", seed=3, **settings, **opts)
    backend.load_state(
        init_params(TowerSpec("gru", DIM, HIDDEN, 2), 4)
    )  # a plain tower's draws: proj non-zero
    return backend


@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_residual_tower_with_seen_item_masking_matches_reference(name: str, opts: dict) -> None:
    backend = residual_engine(name, opts)
    batch = make_batch(
        np.random.default_rng(6), batch=8, steps=6, dim=DIM, hard=3, queue=16, context_ids=True
    )
    params = params_of(backend)
    loss, grads = backend.loss_and_grads(batch)
    expected_loss, expected_grads = reference.loss_and_grads("gru", params, batch, 0.05, "last")
    assert_agrees(np.float32(loss), np.array(expected_loss), np.float32, "loss")
    for param_name, grad in grads.items():
        assert_agrees(grad, expected_grads[param_name], np.float32, param_name)
    q = backend.encode(batch.contexts, batch.lengths)
    expected_q = reference.encode("gru", params, batch.contexts, batch.lengths, "last")
    assert_agrees(q, expected_q, np.float32, "encode")

    # negative controls: without the residual, and without the masking, the numbers move
    plain = reference.encode("gru", params, batch.contexts, batch.lengths)
    assert_differs(q, plain, np.float32, "encode without the residual")
    unmasked = batch.__class__(**{**batch.__dict__, "context_ids": None})
    assert_differs(
        np.float32(backend.loss_and_grads(unmasked)[0]),
        np.array(expected_loss),
        np.float32,
        "loss without masking",
    )


@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_residual_tower_at_init_is_the_last_item_baseline(name: str, opts: dict) -> None:
    backend = backends.get(name, "gru", DIM, HIDDEN, 1, residual="last", seed=3, **opts)
    rng = np.random.default_rng(10)
    batch = make_batch(rng, batch=8, steps=6, dim=DIM)
    rows = np.arange(8)
    last = batch.contexts[rows, batch.lengths - 1].astype(np.float64)
    last /= np.linalg.norm(last, axis=1, keepdims=True)
    q = backend.encode(batch.contexts, batch.lengths)
    assert_agrees(q, last, np.float32, "encode at init")
    bank = rng.standard_normal((500, DIM))
    ranking = np.argsort(-(q.astype(np.float64) @ bank.T), axis=1)[:, :50]
    np.testing.assert_array_equal(ranking, np.argsort(-(last @ bank.T), axis=1)[:, :50])
    # negative control: the plain tower's first queries are somewhere else entirely
    plain = backends.get(name, "gru", DIM, HIDDEN, 1, seed=3, **opts)
    assert_differs(plain.encode(batch.contexts, batch.lengths), last, np.float32, "plain tower")


SCHEDULE = dict(schedule="cosine", warmup=2, total=6)


@pytest.mark.parametrize("tower", ["gru-1", "gru-2-residual-masked"])
@pytest.mark.parametrize(("name", "opts"), ENGINES, ids=ENGINE_IDS)
def test_scheduled_steps_match_reference(name: str, opts: dict, tower: str) -> None:
    """Five clip + AdamW steps at the rates of a warm-up + cosine schedule (2 warm-up steps of 6):
    AdamW state (parameters, both moments, step) agrees with the reference fed lr * f(s)."""
    settings = dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5)
    residual = tower.startswith("gru-2-residual")
    if residual:
        backend = residual_engine(name, opts, **settings)
    else:
        backend = engine(name, opts, "gru-1", **settings)
    params = {k: v.astype(np.float64) for k, v in params_of(backend).items()}
    start = dict(params)
    opt: dict = {}
    rng = np.random.default_rng(13)
    for step in range(5):
        batch = make_batch(rng, batch=8, steps=6, dim=DIM, hard=2, queue=8, context_ids=residual)
        lr = settings["lr"] * reference.lr_factor(step, **SCHEDULE)
        stats = backend.step(batch, lr)
        params, opt, loss, _ = reference.train_step(
            "gru",
            params,
            opt,
            batch,
            0.05,
            lr=lr,
            weight_decay=settings["weight_decay"],
            max_grad_norm=settings["max_grad_norm"],
            residual="last" if residual else "none",
        )
        assert stats.applied
        assert_agrees(np.float32(stats.loss), np.array(loss), np.float32, "loss")

    state = backend.state()
    assert int(state[OPT_STEP]) == 5
    adam_atol = 5 * 1e-3 * settings["lr"]  # as in test_five_steps_match_reference
    for param_name, value in params.items():
        assert_agrees(state[param_name], value, np.float32, param_name, extra_atol=adam_atol)
        assert_agrees(state[OPT_EXP_AVG + param_name], opt["exp_avg"][param_name], np.float32, "m")
        assert_agrees(
            state[OPT_EXP_AVG_SQ + param_name], opt["exp_avg_sq"][param_name], np.float32, "v"
        )

    # negative control: the same five steps at the constant peak rate end elsewhere
    constant, opt = dict(start), {}
    rng = np.random.default_rng(13)
    for _ in range(5):
        batch = make_batch(rng, batch=8, steps=6, dim=DIM, hard=2, queue=8, context_ids=residual)
        constant, opt, _, _ = reference.train_step(
            "gru", constant, opt, batch, 0.05, **settings, residual="last" if residual else "none"
        )
    name_0 = "gru.weight_hh_l0"
    assert_differs(state[name_0], constant[name_0], np.float32, "constant-rate steps")

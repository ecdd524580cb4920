"""The recipe options are the math docs/DESIGN.md writes down: the learning-rate schedule's f(s),
seen-item masking (against torch with those logits set to -inf) and the residual GRU tower,
whose step 0 is exactly the last-item baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import reference
from tests.batches import make_batch
from twotower import Batch
from twotower.batch import candidate_blocks
from twotower.config import TrainConfig
from twotower.data import load_dataset, synthesize
from twotower.training.evaluation.heldout import held_out_split
from twotower.training.schedule import LRSchedule
from twotower.training.trainer import train

# --- the learning-rate schedule ---------------------------------------------------------

WARMUP, TOTAL = 4, 20
# (step, f) written out by hand from docs/DESIGN.md for W = 4, S = 20: warm-up start and end,
# the first step after it, mid-decay (s = 8: 12 of 16 decay steps left; s = 12: half way)
# and the last step of the plan
EXPECTED = {
    "constant": {0: 0.25, 3: 1.0, 4: 1.0, 8: 1.0, 12: 1.0, 19: 1.0},
    "linear": {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.75, 12: 0.5, 19: 1 / 16},
    "cosine": {
        0: 0.25,
        3: 1.0,
        4: 1.0,
        8: 0.5 * (1 + math.cos(math.pi / 4)),
        12: 0.5,
        19: 0.5 * (1 + math.cos(math.pi * 15 / 16)),
    },
}


@pytest.mark.parametrize("schedule", EXPECTED)
def test_scheduled_lr_equals_the_formula_written_here(schedule: str) -> None:
    config = TrainConfig(data="unused", lr_schedule=schedule, warmup_steps=WARMUP, lr=0.02)
    rates = LRSchedule.of(config, TOTAL)
    for step, f in EXPECTED[schedule].items():
        assert reference.lr_factor(step, schedule, WARMUP, TOTAL) == pytest.approx(f, abs=1e-15)
        assert rates.at(step) == pytest.approx(0.02 * f, abs=1e-15), (schedule, step)
    # warm-up is linear from lr / W: the second step has twice the first step's rate
    assert rates.at(1) == pytest.approx(2 * rates.at(0))


def test_without_warmup_the_first_step_has_the_full_rate() -> None:
    for schedule in EXPECTED:
        assert reference.lr_factor(0, schedule, 0, TOTAL) == 1.0


def test_warmup_steps_win_over_the_share_and_a_share_rounds_up() -> None:
    def warmup(**settings) -> int:
        return LRSchedule.of(TrainConfig(data="unused", **settings), 100).warmup

    assert warmup(warmup_share=0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert warmup(warmup_share=0.001) == 1
    assert warmup(warmup_share=0.05, warmup_steps=3) == 3
    assert warmup(warmup_share=0.0) == 0
    assert warmup() == 5  # the default: 5% of the planned steps


# --- seen-item masking ----------------------------------------------------------------------


def torch_masked_infonce(q: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """InfoNCE over the full candidate matrix, the masked logits set to -inf, in float64."""
    size = len(batch.positive_ids)
    losses = []
    for i in range(size):
        order = [i] + [j for j in range(size) if j != i]
        vecs = np.concatenate(
            [batch.positive_vecs[order], batch.hard_vecs[i], batch.queue_vecs]
        ).astype(np.float64)
        ids = np.concatenate([batch.positive_ids[order], batch.hard_ids[i], batch.queue_ids])
        seen = [int(c) for c in batch.context_ids[i] if c >= 0]
        masked = torch.tensor([(c == ids[0] or c == -1 or c in seen) for c in ids.tolist()])
        masked[0] = False  # the positive, even when it is one of the query's context items
        logits = q[i] @ torch.tensor(vecs).T / temperature
        logits = logits.masked_fill(masked, float("-inf"))
        losses.append(torch.logsumexp(logits, dim=0) - logits[0])
    return torch.stack(losses).mean()


def test_masked_loss_equals_torch_with_those_logits_at_minus_infinity() -> None:
    rng = np.random.default_rng(21)
    batch = make_batch(rng, batch=6, steps=4, dim=8, hard=3, queue=7, context_ids=True)
    # the awkward cases the batch was built with really are there
    seen = batch.context_ids
    assert seen[0, 0] == batch.positive_ids[1]  # another query's positive (in-batch)
    assert seen[1, 0] in batch.hard_ids[1]  # one of the query's hard negatives
    assert seen[2, 0] in batch.queue_ids  # a queue entry
    assert seen[3, 0] == batch.positive_ids[3]  # the query's own positive
    q = rng.standard_normal((6, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    loss, dq = reference.infonce(q, batch, 0.05)
    leaf = torch.tensor(q, requires_grad=True)
    expected = torch_masked_infonce(leaf, batch, 0.05)
    expected.backward()
    assert np.isfinite(loss)  # query 3's positive was not masked: its term would be +inf
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(dq, leaf.grad.numpy(), rtol=1e-10, atol=1e-14)

    # negative control: without the context ids the seen candidates count again
    unmasked, _ = reference.infonce(q, Batch(**{**batch.__dict__, "context_ids": None}), 0.05)
    assert unmasked != pytest.approx(loss, rel=1e-6)


def test_candidate_masks_mask_seen_items_but_never_the_positive() -> None:
    """The masks every backend uses, against a loop over docs/DESIGN.md's rule written here."""
    batch = make_batch(np.random.default_rng(4), batch=6, steps=4, dim=8, context_ids=True)
    in_batch, hard, queue = (block.masked for block in candidate_blocks(batch))
    for i in range(6):
        p_i, seen = batch.positive_ids[i], set(batch.context_ids[i][batch.context_ids[i] >= 0])

        def masked(c: int, p_i: int = p_i, seen: set = seen) -> bool:
            return c == p_i or c == -1 or c in seen

        expected_in_batch = [j != i and masked(c) for j, c in enumerate(batch.positive_ids)]
        assert in_batch[i].tolist() == expected_in_batch, i
        assert hard[i].tolist() == [masked(c) for c in batch.hard_ids[i]], i
        assert queue[i].tolist() == [masked(c) for c in batch.queue_ids], i
    assert not in_batch[3, 3] and in_batch[0, 1]  # own positive kept; a seen positive dropped
    clean = candidate_blocks(Batch(**{**batch.__dict__, "context_ids": None}))
    assert not clean[0].masked[0, 1]  # negative control: without context ids it counts


# --- the residual tower starts at the last-item baseline ------------------------------------


def last_item_metrics(data: Path, exclude_context: bool) -> dict[str, float]:
    """recall@1/10/100 and MRR@100 of q = normalize(last context vector) on the run's held-out
    rows, by a float64 brute-force search written here (seen items dropped when asked)."""
    dataset = load_dataset(data)
    _, rows = held_out_split(dataset.num_samples, 0.05, 2000, 0)
    bank = np.asarray(dataset.bank, dtype=np.float64)
    lengths = np.asarray(dataset.lengths[rows])
    ids = np.asarray(dataset.context_ids[rows])
    positives = np.asarray(dataset.positives[rows])
    q = bank[ids[np.arange(len(rows)), lengths - 1]]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ bank.T
    if exclude_context:
        for i, row in enumerate(ids):
            seen = [c for c in row[: lengths[i]] if c != positives[i]]
            scores[i, seen] = -np.inf
    rank = (scores > scores[np.arange(len(rows)), positives][:, None]).sum(axis=1)
    metrics = {f"recall@{c}": float(np.mean(rank < c)) for c in (1, 10, 100)}
    metrics["mrr@100"] = float(np.mean(np.where(rank < 100, 1.0 / (rank + 1), 0.0)))
    return metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=2000, bank=600, dim=16, seq_len=6, seed=4)
    return path


@pytest.mark.parametrize("exclude_context", [False, True], ids=["all-items", "seen-excluded"])
@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
def test_residual_tower_at_step_0_ranks_like_the_last_item_baseline(
    data: Path, tmp_path: Path, backend: str, exclude_context: bool
) -> None:
    result = train(
        TrainConfig(
            data=str(data),
            out=str(tmp_path / "run"),
            backend=backend,
            residual="last",
            exclude_context=exclude_context,
            hidden=8,
            steps=2,
            hard_negatives=0,
            queue_size=0,
            supervise=False,
        )
    )
    expected = last_item_metrics(data, exclude_context)
    assert result.metrics_before == pytest.approx(expected, abs=1e-12)
    assert expected["recall@100"] > 0.05  # the baseline finds something: not zeros vs zeros
    # negative control: the other ranking rule gives other numbers on this data
    assert last_item_metrics(data, not exclude_context) != pytest.approx(expected, abs=1e-3)


def test_a_decaying_schedule_makes_the_planned_length_part_of_the_numbers() -> None:
    """With linear or cosine decay (or a warm-up share) S sets every rate, so a resume with
    another --steps or --epochs is refused; at a constant rate it stays allowed."""
    stored = TrainConfig(data="d", lr_schedule="cosine", steps=100).to_dict()
    assert TrainConfig(data="d", lr_schedule="cosine", steps=200).numeric_differences(stored) == [
        "steps: 100 -> 200"
    ]
    constant = {"lr_schedule": "constant", "warmup_share": 0.0}
    stored = TrainConfig(data="d", steps=100, **constant).to_dict()
    assert TrainConfig(data="d", steps=200, **constant).numeric_differences(stored) == []
    stored = TrainConfig(data="d", warmup_share=0.1, epochs=2, lr_schedule="constant").to_dict()
    assert TrainConfig(
        data="d", warmup_share=0.1, epochs=3, lr_schedule="constant"
    ).numeric_differences(stored) == ["epochs: 2 -> 3"]
    # the default (cosine, 5% warm-up) decays: the planned length is part of the numbers
    stored = TrainConfig(data="d", steps=100).to_dict()
    assert TrainConfig(data="d", steps=200).numeric_differences(stored) == ["steps: 100 -> 200"]

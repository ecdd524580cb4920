"""`twotower.train` on torch-cpu against the plain torch loop of bench/test_backends.py,
on the same work: the same dataset, batch rows, K=8 hard negatives, Q=4096 queue, no eval
inside the measured steps. The trainer runs its default tower, the residual GRU: one (B, D)
gather and add beyond the plain loop's GRU, about 1e-5 of a step's multiply-adds. Target: the
trainer's steady-state step rate >= the plain loop's.

The trainer's step time is the median interval between consecutive `step` records of
its metrics.jsonl (everything between two steps counts: gathering, negatives,
bookkeeping, logging); the plain loop's is pytest-benchmark's median per step.

    pytest bench/test_trainer.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.report import RatioReport
from bench.test_backends import B, D, H, K, Q, plain_torch_step
from twotower import Batch
from twotower.config import TrainConfig
from twotower.data import Dataset, synthesize
from twotower.run.rundir import read_metrics
from twotower.training.batching import StepPlan
from twotower.training.evaluation.heldout import held_out_split
from twotower.training.trainer import train

STEPS = 40
SAMPLES, BANK, T = 4000, 50_000, 10


REPORT_TITLE = "trainer: steady-state step, torch-cpu, B=32 T=10 D=H=768 K=8 Q=4096"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return synthesize(
        tmp_path_factory.mktemp("data") / "seed-shape", samples=SAMPLES, bank=BANK, dim=D, seq_len=T
    )


def config(dataset: Dataset, out: Path) -> TrainConfig:
    return TrainConfig(
        data=str(dataset.path),
        out=str(out),
        backend="torch-cpu",
        steps=STEPS,
        batch_size=B,
        hidden=H,
        hard_negatives=K,
        mine_every=10**9,
        queue_size=Q,
        checkpoint_every=10**9,
        max_eval=64,
        eval_every=0,
        exclude_context=False,  # the plain loop masks no seen items: identical work
        supervise=False,
    )


def test_plain_torch_loop(benchmark, report: RatioReport, dataset: Dataset) -> None:
    """The user's loop: index the arrays, sample K negatives, keep a FIFO queue, step."""
    c = config(dataset, Path("unused"))
    train_rows, _ = held_out_split(dataset.num_samples, c.eval_fraction, c.max_eval, c.seed)
    plan = StepPlan(train_rows, B, c.seed)
    step = plain_torch_step("gru")
    queue_ids = np.full(Q, -1, dtype=np.int64)
    queue_vecs = np.zeros((Q, D), dtype=np.float32)
    state = {"step": 0, "head": 0}

    def one_step() -> float:
        rows = plan.rows_for(state["step"])
        ids = np.asarray(dataset.context_ids[rows])
        contexts = np.where((ids >= 0)[..., None], dataset.bank[np.maximum(ids, 0)], 0).astype(
            np.float32
        )
        positive_ids = np.asarray(dataset.positives[rows], dtype=np.int64)
        hard_ids = np.full(
            (B, K), -1, dtype=np.int64
        )  # the trainer's table before its first mining
        batch = Batch(
            contexts,
            np.asarray(dataset.lengths[rows], dtype=np.int64),
            positive_ids,
            np.asarray(dataset.bank[positive_ids]),
            hard_ids,
            np.asarray(dataset.bank[np.maximum(hard_ids, 0)]),
            queue_ids,
            queue_vecs,
        )
        loss = step(batch)
        slots = (state["head"] + np.arange(B)) % Q
        queue_ids[slots], queue_vecs[slots] = positive_ids, batch.positive_vecs
        state["head"] = (state["head"] + B) % Q
        state["step"] += 1
        return loss

    loss = benchmark.pedantic(one_step, rounds=STEPS, warmup_rounds=2)
    assert np.isfinite(loss)
    report.add("plain torch loop", benchmark)


def test_trainer(benchmark, report: RatioReport, dataset: Dataset, tmp_path: Path) -> None:
    result = benchmark.pedantic(
        lambda: train(config(dataset, tmp_path / "run")), rounds=1, iterations=1
    )
    assert result.steps == STEPS
    times = [
        r["time"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "step"
    ]
    intervals = np.diff(times)[2:]  # as the plain loop, skip two warm-up steps
    steady = float(np.median(intervals))
    report.add(
        "twotower.train (steady state)", benchmark, baseline="plain torch loop", median_s=steady
    )

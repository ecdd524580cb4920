"""Model selection: RUN/best/ holds the parameters of the best evaluation (checked against the
metrics log and an independent search), --patience stops where the log says it should, a
SIGKILL while best/ is written leaves the previous best loadable, and the automatic cadence
keeps evaluation within its budget."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

import reference
from tests.neighbours import independent_recall
from tests.processes import train_in_child
from tests.runs import expected_stop
from twotower.config import TrainConfig
from twotower.data import load_dataset, synthesize
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import BEST_DIR, list_checkpoints, load_checkpoint
from twotower.training.cost import eval_flops, step_flops
from twotower.training.evaluation.cadence import EVAL_BUDGET, auto_eval_every
from twotower.training.evaluation.heldout import held_out
from twotower.training.trainer import train

PARAMS = ("gru.", "proj.")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=800, bank=400, dim=16, seq_len=6, seed=2)
    return path


def settings(data: Path, out: Path, **more: object) -> TrainConfig:
    values: dict = dict(
        data=str(data),
        out=str(out),
        backend="numpy",
        hidden=16,
        batch_size=16,
        hard_negatives=0,
        queue_size=64,
        max_eval=60,
        supervise=False,
        # the plain recipe: the independent checks below encode a plain GRU and rank unmasked
        lr_schedule="constant",
        residual="none",
        exclude_context=False,
    )
    return TrainConfig(**{**values, **more})


def records(run: Path, event: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == event]


def parameters(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k.startswith(PARAMS)}


def test_best_holds_the_parameters_of_the_best_evaluation(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = settings(
        data, out, steps=80, lr=2e-2, eval_every=5, checkpoint_every=5, keep_checkpoints=100
    )
    result = train(config)
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == list(range(0, 81, 5))
    values = [e["mrr@100"] for e in evals]
    best = evals[int(np.argmax(values))]  # the first of equal values: later ties do not replace
    meta, state = load_checkpoint(out, which="best")
    assert meta["step"] == best["step"] == result.best_step
    assert meta["metrics"]["mrr@100"] == best["mrr@100"] == max(values)
    assert [r["step"] for r in records(out, "best")] == [
        e["step"] for i, e in enumerate(evals) if e["mrr@100"] > max(values[:i], default=-1)
    ]
    # the same parameters the training had at that step (its regular checkpoint) ...
    _, at_step = load_checkpoint(out / "checkpoints" / f"step-{best['step']:07d}")
    assert set(state) == set(parameters(at_step))  # parameters only: no optimizer, no queue
    for name, value in parameters(at_step).items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    # ... and they score what the log says, by a float64 search written in the test
    dataset = load_dataset(data)
    rows = held_out(config, dataset).eval_rows
    contexts, lengths, positives = dataset.gather(rows)
    q = reference.encode("gru", state, contexts, lengths)
    found = independent_recall(q, dataset.bank, positives)["mrr@100"]
    assert abs(found - best["mrr@100"]) <= 1 / len(rows) + 1e-4
    # twotower.load_checkpoint keeps its one-argument form (the newest checkpoint) ...
    assert load_checkpoint(out)[0]["step"] == 80
    # ... and reads best/ given as a path too
    assert load_checkpoint(out / BEST_DIR)[0]["step"] == best["step"]


def test_patience_stops_where_the_log_says(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(settings(data, out, steps=400, lr=1e-6, eval_every=4, patience=3))
    evals = records(out, "eval")
    stop = expected_stop(evals, 3)
    assert stop is not None and stop < 400  # a rate this small leaves nothing to gain
    assert result.exit_code == 0 and result.stopped_early and result.steps == stop
    assert evals[-1]["step"] == stop  # no evaluation after the stop
    assert [r["step"] for r in records(out, "early-stop")] == [stop]
    assert records(out, "done")[-1]["step"] == stop
    assert max(r["step"] for r in records(out, "step")) == stop
    assert load_checkpoint(out)[0]["step"] == stop
    assert "stopping early" in (out / "log.txt").read_text()


def test_without_patience_the_run_goes_on(data: Path, tmp_path: Path) -> None:
    """The negative control: the same run, patience 0 (the default), trains every step."""
    out = tmp_path / "run"
    result = train(settings(data, out, steps=40, lr=1e-6, eval_every=4))
    assert result.steps == 40 and not result.stopped_early
    assert expected_stop(records(out, "eval"), 3) is not None  # patience 3 would have stopped


@pytest.mark.slow
def test_a_kill_while_best_is_written_leaves_the_previous_best(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = (
        "--no-supervise --backend numpy --hidden 16 --batch-size 16 --hard-negatives 0 "
        "--queue-size 64 --max-eval 60 --steps 30 --lr 3e-3 --eval-every 5 "
        "--checkpoint-every 5 --keep-checkpoints 10 --lr-schedule constant --residual none "
        "--no-exclude-context"
    ).split()
    killed = train_in_child(data, out, *args, TWOTOWER_INJECT_FAULT="kill@checkpoint:10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    at_10 = [e for e in records(out, "eval") if e["step"] == 10]
    assert at_10 and at_10[0]["best"]  # step 10 improved: its best/ write is where it died
    assert [r["step"] for r in records(out, "best")] == [0, 5]
    assert list((out / BEST_DIR).glob(".tmp-step-0000010-*")), "killed before the commit"
    meta, state = load_checkpoint(out, which="best")
    assert meta["step"] == 5
    _, at_5 = load_checkpoint(out / "checkpoints" / "step-0000005")
    for name, value in parameters(at_5).items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    assert [p.name for p in list_checkpoints(out)][-1] == "step-0000005"

    resumed = train_in_child(data, out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    meta, _ = load_checkpoint(out, which="best")
    assert meta["step"] >= 10 and not list((out / BEST_DIR).glob(".tmp-*"))


def test_the_automatic_cadence_stays_within_its_budget() -> None:
    # the seed's scale: 771k x 768 bank, 2,000 held-out queries, 11k steps an epoch
    seed_scale = TrainConfig(data="x")
    every = auto_eval_every(seed_scale, 768, 10, 2000, 771_000, 11_000)
    share = eval_flops(seed_scale, 768, 10, 2000, 771_000) / (
        every * step_flops(seed_scale, 768, 10)
    )
    assert EVAL_BUDGET * 0.9 <= share <= EVAL_BUDGET  # rounded up by less than 10%
    # a GRU step by hand: 3 x B x (T x 2 x 3H(D + H) + 2DH + 2(B + K + Q)D)
    hand = 3 * 32 * (10 * 2 * 3 * 768 * 1536 + 2 * 768 * 768 + 2 * (32 + 8 + 4096) * 768)
    assert step_flops(seed_scale, 768, 10) == hand
    # small data: evaluation is cheap, so a quarter epoch decides
    assert auto_eval_every(seed_scale, 16, 6, 40, 400, 47) == 12

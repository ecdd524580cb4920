"""Small training runs the tests share: the resume run's settings (STEPS, BATCH, TRAIN_ARGS,
also the supervisor tests' run), a config just big enough for a miner's build, readings of
a run's metrics log (each step's batch digests, where --patience should have stopped), and the
bitwise comparison of two runs' final checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import twotower
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint

STEPS = 30
BATCH = 16
TRAIN_ARGS = (
    f"--no-supervise --steps {STEPS} --batch-size {BATCH} --hidden 12 --hard-negatives 3 "
    "--mine-every 10 --mine-lead 4 --mine-pool 6 --queue-size 40 --checkpoint-every 7 "
    "--keep-checkpoints 2 --max-eval 40 --deterministic"
).split()


def tiny_config(data: Path, out: Path, **settings) -> twotower.TrainConfig:
    """Two numpy steps over `data`, mining set up but not run: what a miner's build needs."""
    return twotower.TrainConfig(
        data=str(data),
        out=str(out),
        backend="numpy",
        steps=2,
        batch_size=8,
        hidden=8,
        max_eval=20,
        **settings,
    )


def assert_same_state(run: Path, straight: Path) -> None:
    """Bitwise: parameters, optimizer moments and queue of the two runs' final checkpoints,
    both at step STEPS."""
    meta, state = load_checkpoint(run)
    expected_meta, expected = load_checkpoint(straight)
    assert meta["step"] == expected_meta["step"] == STEPS
    assert set(state) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def step_digests(run: Path) -> dict[int, list[str]]:
    """Step number -> every batch digest logged for it, in order (a resumed run repeats some)."""
    logged: dict[int, list[str]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        if record["event"] == "step":
            logged.setdefault(record["step"], []).append(record["batch"])
    return logged


def expected_stop(evals: list[dict], patience: int, metric: str = "mrr@100") -> int | None:
    """The step of the evaluation after which `patience` evaluations in a row did not beat
    the best (strictly), by reading the log; None if that never happened."""
    best, stale = None, 0
    for record in evals:
        if best is None or record[metric] > best:
            best, stale = record[metric], 0
        else:
            stale += 1
            if stale == patience:
                return record["step"]
    return None

"""The README's resume line as written: `twotower train --out runs/mine --resume`, run from the
runs' parent directory, continues a run with the settings it was started with.

A run with non-default flags is interrupted by a real SIGINT (the signal Ctrl-C sends) to
its supervisor, which prints the exact command to continue; that command, and nothing else,
finishes it bit for bit where the same run uninterrupted ends. The same line continues a
--demo run, and `--resume --backend numpy` continues one on another engine.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.processes import run_twotower, signal_after_steps
from twotower import backends
from twotower.data import synthesize
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint

STEPS = 200  # long enough (seconds) that a SIGINT sent after the third step lands mid-run
FLAGS = (
    f"--backend numpy --steps {STEPS} --batch-size 16 --hidden 24 --hard-negatives 3 "
    "--mine-every 40 --mine-pool 6 --queue-size 40 --checkpoint-every 30 --max-eval 40 "
    "--lr 0.003 --seed 3"
).split()
RESUME = ["train", "--out", "runs/mine", "--resume"]


def twotower(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m twotower ARGS` in `cwd`, as a user types it there."""
    return run_twotower(*args, timeout=600, cwd=cwd, **env)


def summary_line(stderr: str) -> str:
    """The end-of-run line: recall@10 at step 0 and at the newest evaluation."""
    return next(line for line in stderr.splitlines() if "recall@10 at step 0" in line).split(
        "twotower: ", 1
    )[-1]


def assert_same_state(run: Path, expected_run: Path, step: int) -> None:
    """The newest checkpoint (at `step`) and best/ hold the same arrays in both runs."""
    meta, state = load_checkpoint(run)
    expected_meta, expected = load_checkpoint(expected_run)
    assert meta["step"] == expected_meta["step"] == step
    assert set(state) == set(expected) and "queue.ids" in state
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    best_meta, best = load_checkpoint(run, which="best")
    assert best_meta["step"] == load_checkpoint(expected_run, which="best")[0]["step"]
    for name, value in load_checkpoint(expected_run, which="best")[1].items():
        np.testing.assert_array_equal(best[name], value, err_msg=f"best/{name}")


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A directory holding a dataset at ./data, as a user's project would."""
    synthesize(tmp_path / "data", samples=600, bank=400, dim=16, seq_len=6, seed=1)
    return tmp_path


def test_interrupted_run_continues_with_the_printed_command_bit_for_bit(workdir: Path) -> None:
    straight = twotower(workdir, "train", "--data", "data", "--out", "runs/straight", *FLAGS)
    assert straight.returncode == 0, straight.stderr

    train = ["train", "--data", "data", "--out", "runs/mine", *FLAGS]  # supervised, as typed
    stopped = signal_after_steps(workdir / "runs/mine", signal.SIGINT, 3, *train, cwd=workdir)
    assert stopped.returncode == 130, stopped.stderr
    stopped_at = load_checkpoint(workdir / "runs/mine")[0]["step"]
    assert 3 <= stopped_at < STEPS, "the run ended before the signal: make it longer"
    assert "resume with: twotower train --out runs/mine --resume" in stopped.stderr
    # the summary names the step it stopped at, evaluating there unless an evaluation of the
    # cadence already did (a signal that lands during one stops at its step): one, either way
    assert f", at step {stopped_at}: " in summary_line(stopped.stderr)
    evals = [r for r in read_metrics(workdir / "runs/mine/metrics.jsonl") if r["event"] == "eval"]
    at_stop = [r for r in evals if r["step"] == stopped_at]
    assert evals[-1]["step"] == stopped_at and len(at_stop) == 1
    off_cadence = [r for r in evals if "selected" in r]
    assert all(r["selected"] is False for r in off_cadence) and len(off_cadence) <= 1

    resumed = twotower(workdir, *RESUME)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step-{stopped_at:07d}" in resumed.stderr
    assert_same_state(workdir / "runs/mine", workdir / "runs/straight", STEPS)
    assert summary_line(resumed.stderr).startswith("recall@10 at step 0: ")
    assert f", at step {STEPS}: " in summary_line(resumed.stderr)

    # negative control: a run that differs in one flag ends elsewhere
    other = [*FLAGS[:-1], "4"]  # --seed 4
    assert (
        twotower(workdir, "train", "--data", "data", "--out", "runs/other", *other).returncode == 0
    )
    with pytest.raises(AssertionError):
        assert_same_state(workdir / "runs/other", workdir / "runs/straight", STEPS)


def test_resume_refuses_a_flag_that_changes_the_numbers_naming_it(workdir: Path) -> None:
    first = twotower(
        workdir,
        "train",
        "--data",
        "data",
        "--out",
        "runs/mine",
        *FLAGS[:2],
        "--steps",
        "4",
        "--hidden",
        "8",
        "--no-supervise",
    )
    assert first.returncode == 0, first.stderr
    refused = twotower(workdir, *RESUME, "--lr", "0.5")
    assert refused.returncode == 2
    assert "lr: 0.001 -> 0.5" in refused.stderr and len(refused.stderr.splitlines()) == 1


@pytest.mark.skipif("torch-cpu" not in backends.available(), reason="torch-cpu is not available")
def test_resume_continues_on_another_engine(workdir: Path) -> None:
    args = ["train", "--data", "data", "--out", "runs/mine", "--backend", "torch-cpu"]
    args += ["--steps", "12", "--hidden", "8", "--checkpoint-every", "5", "--no-supervise"]
    killed = twotower(workdir, *args, TWOTOWER_INJECT_FAULT="kill@step:7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = twotower(workdir, *RESUME, "--backend", "numpy")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-0000005 (step 5, made on torch-cpu)" in resumed.stderr
    meta, _ = load_checkpoint(workdir / "runs/mine")
    assert (meta["step"], meta["backend"]) == (12, "numpy")


def test_the_readme_line_continues_a_demo_run(tmp_path: Path) -> None:
    """No --demo, no --steps: the demo run's own settings come back from its config.json."""
    cache = str(tmp_path / "cache")
    args = ["train", "--demo", "--out", "runs/mine", "--backend", "numpy", "--hidden", "16"]
    args += ["--steps", "8", "--checkpoint-every", "4", "--max-eval", "50", "--no-supervise"]
    killed = twotower(tmp_path, *args, TWOTOWER_CACHE=cache, TWOTOWER_INJECT_FAULT="kill@step:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = twotower(tmp_path, *RESUME, TWOTOWER_CACHE=cache)
    assert resumed.returncode == 0, resumed.stderr
    meta, state = load_checkpoint(tmp_path / "runs/mine")
    assert meta["step"] == 8 and state["gru.weight_hh_l0"].shape == (3 * 16, 16)

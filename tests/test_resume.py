"""A run killed for real (SIGKILL in a child) and resumed ends bitwise equal to one never killed.

Checked on numpy and torch-cpu: parameters, optimizer moments, the queue, and
the batch of every step. Kill points: between steps, at an epoch boundary,
right after a mining refresh (before and after the checkpoint that holds it), and while a
refresh is in flight (taken at step 6, used at 10; the checkpoint at 7 holds its queries).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.processes import signal_after_steps, train_in_child
from tests.runs import BATCH, STEPS, TRAIN_ARGS, step_digests
from twotower import backends
from twotower.data import synthesize
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint
from twotower.training.evaluation.heldout import held_out_split

SAMPLES = 300  # 285 training rows: 17 batches per epoch, so the run crosses an epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=SAMPLES, bank=300, dim=16, seq_len=6, seed=1)
    return path


def batches_per_epoch() -> int:
    train_rows, _ = held_out_split(SAMPLES, 0.05, 40, 0)
    return len(train_rows) // BATCH


def train(dataset: Path, out: Path, backend: str, *extra: str, **env: str):
    return train_in_child(dataset, out, "--backend", backend, *TRAIN_ARGS, *extra, **env)


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for backend in {"numpy", "torch-cpu"} & set(backends.available()):
        out = tmp_path_factory.mktemp("straight") / backend
        result = train(dataset, out, backend)
        assert result.returncode == 0, result.stderr
        runs[backend] = out
    return runs


KILL_POINTS = {
    "mining-in-flight": 9,  # resumed from the checkpoint at 7: refresh taken at 6, used at 10
    "between-steps": 12,
    "epoch-boundary": batches_per_epoch(),  # the first step of epoch 1
    "right-after-mining": 20,  # mined at 20; the newest checkpoint (14) predates it
    "after-mining-checkpoint": 22,  # the checkpoint at 21 refers to the table mined at 20
}


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS.values(), ids=KILL_POINTS.keys())
@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
def test_killed_and_resumed_run_is_bitwise_equal(
    dataset: Path, uninterrupted: dict[str, Path], tmp_path: Path, backend: str, kill_at: int
) -> None:
    if backend not in backends.available():
        pytest.skip(f"{backend} is not available")
    out = tmp_path / "run"
    killed = train(dataset, out, backend, TWOTOWER_INJECT_FAULT=f"kill@step:{kill_at}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert max(step_digests(out)) == kill_at, "the child did not die where it was told to"
    if kill_at == KILL_POINTS["mining-in-flight"]:
        in_flight = load_checkpoint(out)[0]["mining"]
        assert (in_flight["take"], in_flight["use"]) == (6, 10)
        assert (out / "mined" / in_flight["queries"]).is_file()

    resumed = train(dataset, out, backend, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    straight = uninterrupted[backend]
    meta, state = load_checkpoint(out)
    expected_meta, expected = load_checkpoint(straight)
    assert meta["step"] == expected_meta["step"] == STEPS
    assert set(state) == set(expected)
    assert any(name.startswith("opt.") for name in state) and "queue.ids" in state
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)

    resumed_batches = step_digests(out)
    straight_batches = {step: digests[0] for step, digests in step_digests(straight).items()}
    assert sorted(resumed_batches) == list(range(1, STEPS + 1))
    for step, digests in resumed_batches.items():
        assert set(digests) == {straight_batches[step]}, f"step {step} trained on another batch"


RECIPE = "--lr-schedule cosine --warmup-steps 20 --residual last --exclude-context".split()


def expected_lr(step: int) -> float:
    """docs/DESIGN.md's f(s) for W = 20 of S = 30 at the default lr 1e-3, written here."""
    if step < 20:
        return 1e-3 * (step + 1) / 20
    return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 20) / 10))


def killed_at_12_and_resumed(dataset: Path, tmp_path: Path, backend: str, *args: str) -> Path:
    """Train with `args` straight and, in another run, killed at step 12 (newest checkpoint:
    7) then resumed; assert both end bitwise equal; return the resumed run."""
    straight = tmp_path / "straight"
    assert train(dataset, straight, backend, *args).returncode == 0
    out = tmp_path / "run"
    killed = train(dataset, out, backend, *args, TWOTOWER_INJECT_FAULT="kill@step:12")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = train(dataset, out, backend, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _, state = load_checkpoint(out)
    _, expected = load_checkpoint(straight)
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
def test_resumed_mid_warmup_is_bitwise_equal(dataset: Path, tmp_path: Path, backend: str) -> None:
    """Killed at step 12 of a 20-step warm-up (newest checkpoint: 7), with the residual tower
    and seen-item masking on: the resumed run recomputes every rate and ends bit for bit where
    the uninterrupted one does; each logged lr is the formula's."""
    if backend not in backends.available():
        pytest.skip(f"{backend} is not available")
    out = killed_at_12_and_resumed(dataset, tmp_path, backend, *RECIPE)
    state = load_checkpoint(out)[1]
    rates = {
        r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"
    }
    assert sorted(rates) == list(range(1, STEPS + 1))
    for step, lr in rates.items():  # metrics log step s + 1 for the update made at s
        assert lr == pytest.approx(expected_lr(step - 1), rel=1e-12), step

    # negative control: the same run at a constant rate ends elsewhere
    constant = tmp_path / "constant"
    at_constant = [*RECIPE[2:], "--lr-schedule", "constant"]  # cosine is the default
    assert train(dataset, constant, backend, *at_constant).returncode == 0
    assert not np.array_equal(load_checkpoint(constant)[1]["proj.weight"], state["proj.weight"])


BANK = "--bank-negatives sampled --sampled-negatives 50 --logq".split()


@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
def test_resumed_with_sampled_bank_negatives_is_bitwise_equal(
    dataset: Path, tmp_path: Path, backend: str
) -> None:
    """Sampled bank rows (each step's own stream) and logQ (its table kept with the run):
    killed at step 12 (newest checkpoint: 7) and resumed, the run ends bit for bit where the
    uninterrupted one does."""
    if backend not in backends.available():
        pytest.skip(f"{backend} is not available")
    out = killed_at_12_and_resumed(dataset, tmp_path, backend, *BANK)
    assert (out / "logq.npy").is_file()
    state = load_checkpoint(out)[1]
    # negative control: other sampled rows (S = 49) end elsewhere
    other = tmp_path / "other"
    fewer = [*BANK[:2], "--sampled-negatives", "49", "--logq"]
    assert train(dataset, other, backend, *fewer).returncode == 0
    assert not np.array_equal(load_checkpoint(other)[1]["proj.weight"], state["proj.weight"])


def test_a_different_run_differs(
    dataset: Path, uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    """Negative control for the parity test: another seed must not produce the same state."""
    out = tmp_path / "other-seed"
    assert train(dataset, out, "numpy", "--seed", "5").returncode == 0
    _, state = load_checkpoint(out)
    _, expected = load_checkpoint(uninterrupted["numpy"])
    assert not np.array_equal(state["proj.weight"], expected["proj.weight"])
    assert step_digests(out)[1] != step_digests(uninterrupted["numpy"])[1]


def test_sigterm_checkpoints_and_exits_130(dataset: Path, tmp_path: Path) -> None:
    """A real SIGTERM mid-run: a checkpoint of the current step, exit code 130, then resumable."""
    out = tmp_path / "run"
    args = ["--data", str(dataset), "--out", str(out), "--backend", "numpy", *TRAIN_ARGS]
    args[args.index("--steps") + 1] = "100000"
    stopped = signal_after_steps(out, signal.SIGTERM, 5, "train", *args)
    stderr = stopped.stderr
    assert stopped.returncode == 130, stderr
    done = max(step_digests(out))
    meta, _ = load_checkpoint(out)
    assert meta["step"] == done
    assert "SIGTERM" in stderr and "--resume" in stderr

"""One writer owns a run directory (twotower/run/lock.py), checked with real processes: a second
trainer on a run in use is refused at once naming the holder while a reader (eval) runs beside
it, and the first ends bit for bit equal to a run nobody disturbed; a run killed whole (SIGKILL
to supervisor and trainer) leaves a lock whose holder is gone, which the resume takes over,
ending bit for bit equal too."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.processes import REPO, child_env, run_twotower
from tests.runs import TRAIN_ARGS, assert_same_state
from twotower.data import synthesize
from twotower.run.lock import RunInUse, RunLock, read_holder
from twotower.run.rundir import read_metrics

SUPERVISED_ARGS = tuple(arg for arg in TRAIN_ARGS if arg != "--no-supervise")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=300, bank=300, dim=16, seq_len=6, seed=1)
    return path


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(dataset), "--out", str(out), "--backend", "numpy", *extra]


@pytest.fixture(scope="module")
def undisturbed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_twotower(*train_args(dataset, out, *TRAIN_ARGS))
    assert result.returncode == 0, result.stderr
    return out


@contextlib.contextmanager
def supervised_run(
    dataset: Path, out: Path, steps: int, **env: str
) -> Iterator[subprocess.Popen[str]]:
    """`twotower train` (supervised) in a child without PYTHONUNBUFFERED, `env` added, yielded
    once it has logged `steps` steps; killed on the way out if it still runs."""
    process = subprocess.Popen(
        [sys.executable, "-m", "twotower", *train_args(dataset, out, *SUPERVISED_ARGS)],
        env=child_env(**env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while logged_steps(out) < steps and process.poll() is None:
            assert time.monotonic() < deadline, f"{steps} steps never logged"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def logged_steps(run: Path) -> int:
    if not (run / "metrics.jsonl").exists():
        return 0
    return sum(record["event"] == "step" for record in read_metrics(run / "metrics.jsonl"))


def signal_tree(pid: int, signum: int) -> list[int]:
    """Send `signum` to `pid` and every descendant (the supervisor and its trainer)."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in tree:
        os.kill(process.pid, signum)
    return [process.pid for process in tree]


def test_a_second_trainer_is_refused_and_the_first_ends_undisturbed(
    dataset: Path, undisturbed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with supervised_run(dataset, out, 8) as first:  # the checkpoint at 7 is committed
        signal_tree(first.pid, signal.SIGSTOP)  # still holding its lock, mid-run
        try:
            started = time.monotonic()
            second = run_twotower("train", "--out", str(out), "--resume", timeout=60)
            took = time.monotonic() - started
            reader = run_twotower("eval", "--run", str(out), "--checkpoint", "latest")
        finally:
            signal_tree(first.pid, signal.SIGCONT)
        _, err_text = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if "in use" in line]
    assert len(lines) == 1, second.stderr
    assert f"pid {first.pid} on {socket.gethostname()} since " in lines[0]
    assert took < 30  # refused at once: no data loaded, no engine built
    assert reader.returncode == 0 and "tower: step " in reader.stdout, reader.stderr  # no lock
    assert first.returncode == 0, err_text
    assert_same_state(out, undisturbed)
    assert read_holder(out) is None  # released at the end


def test_a_run_killed_whole_resumes_over_its_stale_lock(
    dataset: Path, undisturbed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with supervised_run(dataset, out, 12, TWOTOWER_INJECT_FAULT="hang@step:12") as first:
        killed = signal_tree(first.pid, signal.SIGKILL)  # it waits at step 12 for this
        first.communicate(timeout=60)
    holder = read_holder(out)
    assert holder is not None and holder.pid == first.pid and first.pid in killed
    resumed = run_twotower("train", "--out", str(out), "--resume", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of pid {first.pid} on {socket.gethostname()}" in resumed.stderr
    assert_same_state(out, undisturbed)


def test_the_lock_is_one_holder_at_a_time_and_free_once_released(tmp_path: Path) -> None:
    """In one process two opens of RUN/lock conflict as two processes would (flock is per open
    file), so the refusal and the release are checked here without a child."""
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunInUse, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # released cleanly: nothing to take over
    again.release()

"""The thread budget: the rule's numbers, a miner worker that holds to its share (read back
through threadpoolctl inside the worker), a trainer that holds to its share (its heartbeat,
written from threadpoolctl inside it), and the threadpoolctl import that leaves
KMP_DUPLICATE_LIB_OK as it was."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.processes import REPO, child_env, train_in_child
from twotower import backends, miners
from twotower.data import synthesize
from twotower.process.threads import SPLIT_MIN_FLOPS, thread_budget, usable_cores
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# A step of B = 32 at this width is over SPLIT_MIN_FLOPS (about 1.7 GFLOP), so the budget
# splits it; on some CPUs torch-cpu's results at this width depend on the thread count.
WIDE = 384


@pytest.mark.parametrize(
    ("cores", "worker", "overlapped", "trainer", "beside", "miner"),
    [
        (2, False, False, 2, 2, None),  # exact in the trainer: mining blocks the step
        (2, True, False, 2, 2, 2),  # a worker the trainer waits for: they take turns
        (2, True, True, 2, 1, 1),  # overlapped on 2 cores: 1 + 1 while the worker searches
        (3, True, True, 3, 2, 1),  # the odd core goes to the trainer
        (8, True, True, 8, 4, 4),
        (1, True, True, 1, 1, 1),  # one core: oversubscribed, and said so
    ],
)
def test_the_budget_rule(
    cores: int, worker: bool, overlapped: bool, trainer: int, beside: int, miner: int | None
) -> None:
    budget = thread_budget(cores, miner_in_worker=worker, overlapped=overlapped)
    assert (budget.trainer, budget.trainer_beside_search) == (trainer, beside)
    assert (budget.miner, budget.miner_in_worker) == (miner, worker)
    assert ("oversubscribe" in budget.rule) == (overlapped and beside + (miner or 0) > cores)


def test_an_overlapped_split_sums_to_the_cores_and_explicit_shares_win() -> None:
    for cores in range(2, 65):
        budget = thread_budget(cores, miner_in_worker=True, overlapped=True)
        assert budget.trainer == cores  # between searches the trainer has every core
        beside, miner = budget.trainer_beside_search, budget.miner or 0
        assert beside + miner == cores and beside >= miner
    mine = thread_budget(8, threads=6, miner_threads=3, miner_in_worker=True, overlapped=True)
    assert (mine.trainer, mine.trainer_beside_search, mine.miner) == (6, 6, 3)
    assert "oversubscribe 8 cores" in mine.rule
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("cores", "flops", "threads", "step"),
    [
        (2, SPLIT_MIN_FLOPS / 10, None, 1),  # the demo's 0.16 GFLOP: its steps on 1 thread
        (8, SPLIT_MIN_FLOPS * 0.99, None, 1),
        (2, SPLIT_MIN_FLOPS, None, None),  # big enough to split: every core
        (2, None, None, None),  # unknown: every core
        (2, SPLIT_MIN_FLOPS / 10, 2, None),  # --threads fixes the steps' count too
        (1, SPLIT_MIN_FLOPS / 10, None, None),  # one core: nothing to drop
    ],
)
def test_a_step_too_small_to_split_runs_on_one_thread_and_evaluation_on_all(
    cores: int, flops: float | None, threads: int | None, step: int | None
) -> None:
    budget = thread_budget(cores, threads, step_flops=flops)
    assert budget.step == step
    expected_step = step or threads or cores
    assert budget.count(stepping=True, searching=False) == expected_step
    assert budget.count(stepping=False, searching=False) == (threads or cores)
    assert ("too small to split" in budget.describe()) == (step is not None)
    shared = thread_budget(4, step_flops=flops, miner_in_worker=True, overlapped=True)
    assert shared.count(stepping=True, searching=True) == min(2, shared.step or 2)
    assert shared.count(stepping=False, searching=True) == 2


@pytest.mark.skipif(
    usable_cores() < 2 or "torch-cpu" not in backends.available(), reason="needs 2 cores, torch"
)
def test_a_small_model_steps_on_one_thread_and_evaluates_on_every_core(
    small_data: Path, tmp_path: Path
) -> None:
    """hidden 16 over 16-d vectors, a step of about 0.01 GFLOP: every step's record says 1
    thread; the last heartbeat, written after the final evaluation, has every core's pools."""
    out = tmp_path / "run"
    args = "--no-supervise --backend torch-cpu --hidden 16 --steps 6 --max-eval 20".split()
    result = train_in_child(small_data, out, *args)
    assert result.returncode == 0, result.stderr
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert len(steps) == 6 and {r["threads"] for r in steps} == {1}
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["threads"]["step"] == 1
    assert max(pool["num_threads"] for pool in beat["threadpools"]) == usable_cores()


WORKER_MINERS = ["exact"] + [m for m in ("faiss",) if m in miners.available()]


@pytest.mark.parametrize("name", WORKER_MINERS)
def test_a_worker_holds_to_its_thread_share(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    pools = {}
    for threads in (1, None):
        miner = miners.get(name, isolation="process", threads=threads, cache_dir=tmp_path)
        try:
            pools[threads] = miner.threadpools()  # type: ignore[attr-defined]
        finally:
            miner.close()
    apis = {pool["user_api"] for pool in pools[1]}
    assert "blas" in apis and ("openmp" in apis or name == "exact")
    assert {pool["num_threads"] for pool in pools[1]} == {1}
    if (os.cpu_count() or 1) > 1:  # negative control: without a share, a pool has every core
        assert max(pool["num_threads"] for pool in pools[None]) > 1


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=300, bank=200, dim=16, seq_len=6, seed=3)
    return path


@pytest.mark.skipif("torch-cpu" not in backends.available(), reason="needs torch")
def test_the_trainer_holds_to_its_thread_share(small_data: Path, tmp_path: Path) -> None:
    """--threads 1: every pool the trainer loaded (torch's OpenMP, numpy's BLAS) has one
    thread, as threadpoolctl reads them inside the trainer into its heartbeat."""
    out = tmp_path / "run"
    args = "--no-supervise --backend torch-cpu --hidden 16 --steps 4 --max-eval 20".split()
    result = train_in_child(small_data, out, *args, "--threads", "1")
    assert result.returncode == 0, result.stderr
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["threads"]["trainer"] == 1 and not beat["threads"]["miner_in_worker"]
    owners = {pool["filepath"] for pool in beat["threadpools"]}
    assert any("torch" in path for path in owners), owners
    assert {pool["num_threads"] for pool in beat["threadpools"]} == {1}
    assert beat["openmp"] == sorted(
        p["filepath"] for p in beat["threadpools"] if p["user_api"] == "openmp"
    )
    assert "threads: trainer 1 thread of" in (out / "log.txt").read_text()


def test_a_crash_report_carries_the_thread_pools_of_the_trainer(
    small_data: Path, tmp_path: Path
) -> None:
    """The supervisor cannot run threadpoolctl in its child: the report's pools and budget
    are the ones the trainer recorded in its heartbeat before it died."""
    out = tmp_path / "run"
    args = "--backend numpy --hidden 16 --steps 6 --max-eval 20 --threads 1".split()
    result = train_in_child(small_data, out, *args, TWOTOWER_INJECT_FAULT="segv@step:3")
    assert result.returncode == 0, result.stderr
    found = json.loads((out / "crashes" / "attempt-1.json").read_text())
    assert found["exit"]["signal"] == "SIGSEGV"
    assert found["threads"]["trainer"] == 1
    assert found["threadpools"] and {p["num_threads"] for p in found["threadpools"]} == {1}


PROBE = """
import os, sys
import {module}
print(os.environ.get("KMP_DUPLICATE_LIB_OK"))
"""


@pytest.mark.skipif(not importlib.util.find_spec("threadpoolctl"), reason="needs threadpoolctl")
def test_reading_thread_pools_leaves_the_duplicate_openmp_check_on() -> None:
    """threadpoolctl sets KMP_DUPLICATE_LIB_OK=True on import; twotower's import undoes it,
    so Intel's and LLVM's OpenMP still abort on a second runtime in the trainer's children."""
    env = {k: v for k, v in child_env().items() if k != "KMP_DUPLICATE_LIB_OK"}

    def seen(module: str) -> str:
        probe = PROBE.format(module=module)
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert seen("threadpoolctl") == "True"  # the control: the library does set it
    assert seen("twotower.process.threads") == "None"


@pytest.mark.skipif(
    usable_cores() < 2 or "torch-cpu" not in backends.available(), reason="needs 2 cores, torch"
)
def test_the_trainer_gives_up_cores_only_while_its_worker_searches(tmp_path: Path) -> None:
    """Overlapped mining in a worker, a step big enough to split (WIDE): each refresh's
    record and each step's carry the trainer's share while the worker searches (from a
    refresh's take step 2 to its use at 4, 6 to 8), every core otherwise; the last
    heartbeat has the pools after the searches (every core again)."""
    data, out = tmp_path / "data", tmp_path / "run"
    synthesize(data, samples=300, bank=200, dim=WIDE, seq_len=8, seed=3)
    args = f"--no-supervise --backend torch-cpu --hidden {WIDE} --steps 10 --max-eval 20".split()
    args += "--hard-negatives 2 --miner exact --miner-isolation process --mine-overlap".split()
    result = train_in_child(data, out, *args, "--mine-every", "4", "--mine-lead", "2")
    assert result.returncode == 0, result.stderr
    cores = usable_cores()
    records = read_metrics(out / "metrics.jsonl")
    mined = [r for r in records if r["event"] == "mined"]
    assert len(mined) == 2 and {r["trainer_threads"] for r in mined} == {cores - cores // 2}
    shared = {3, 4, 7, 8}  # steps (counted after them) that ran inside a search window
    for record in (r for r in records if r["event"] == "step"):
        expected = cores - cores // 2 if record["step"] in shared else cores
        assert record["threads"] == expected, record
    beat = json.loads((out / "heartbeat.json").read_text())
    assert {pool["num_threads"] for pool in beat["threadpools"]} == {cores}
    log_text = (out / "log.txt").read_text()
    assert f"threads: trainer {cores} ({cores - cores // 2} while the worker searches)" in log_text


SPLIT_ARGS = (
    f"--no-supervise --backend torch-cpu --hidden {WIDE} --batch-size 32 --steps 20 "
    "--max-eval 20 --hard-negatives 2 --miner exact --miner-isolation process --mine-overlap "
    "--mine-every 10 --mine-lead 6 --checkpoint-every 7 --keep-checkpoints 5"
).split()


@pytest.mark.slow
@pytest.mark.skipif(
    usable_cores() < 2 or "torch-cpu" not in backends.available(), reason="needs 2 cores, torch"
)
def test_a_run_resumed_inside_a_search_window_computes_the_same_bits(tmp_path: Path) -> None:
    """The trainer's thread count of each step follows from the config (its share from the
    refresh's take step 4 to its use at 10), not from when the search happened to end: a run
    killed at step 9 and resumed from the checkpoint at 7, whose search starts again then,
    ends bitwise equal to the run never killed.

    The control is the same run on one thread: where this CPU's torch gives it different
    parameters, a thread count that followed the search's timing would show in the resumed
    run, and the parity above proves the count does not. Where the two agree (torch splits
    this step's work the same on this CPU at any count), the parity holds whatever the
    count, and the test says so in a warning rather than claim a power it lacks here."""
    data = tmp_path / "data"
    synthesize(data, samples=400, bank=300, dim=WIDE, seq_len=8, seed=5)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_in_child(data, straight, *SPLIT_ARGS).returncode == 0
    killed = train_in_child(data, resumed, *SPLIT_ARGS, TWOTOWER_INJECT_FAULT="kill@step:9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    result = train_in_child(data, resumed, *SPLIT_ARGS, "--resume")
    assert result.returncode == 0, result.stderr
    expected, state = load_checkpoint(straight)[1], load_checkpoint(resumed)[1]
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    one_thread = train_in_child(data, tmp_path / "one", *SPLIT_ARGS, "--threads", "1")
    assert one_thread.returncode == 0, one_thread.stderr
    other = load_checkpoint(tmp_path / "one")[1]
    if not any(not np.array_equal(other[name], value) for name, value in expected.items()):
        warnings.warn(
            "torch-cpu computes this run bit for bit alike on 1 thread and on every core on "
            "this CPU, so the parity above cannot tell a count that followed the search's timing",
            stacklevel=1,
        )

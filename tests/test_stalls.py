"""Stalls and contention (`twotower.process.stalls`), read beside real competing processes: one
outside this process's tree (other work on the machine) and one inside it (a child, as a miner
worker is); the doctor's findings; the step-time arithmetic. No time is asserted: only which
side of the ledger CPU lands on and what the verdict says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from twotower.diagnose.doctor import check_machine_load, check_wait_policy
from twotower.process import stalls
from twotower.process.threads import usable_cores

COMPETITOR = "import numpy as np\na = np.random.rand(1500, 1500)\nwhile True:\n    a @ a\n"
CORES = usable_cores()


def start_outside() -> int:
    """A BLAS loop on every core that is not in this process's tree: started by a shell that
    exits, so it is re-parented; returns its PID."""
    command = f"{sys.executable} -c '{COMPETITOR}' >/dev/null 2>&1 & echo $!"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(CORES)}
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    return int(done.stdout.strip())


@pytest.fixture
def outside() -> Iterator[int]:
    pid = start_outside()
    time.sleep(0.5)  # its matrices made, it multiplies
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def inside() -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    child = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
    time.sleep(0.5)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_other_processes_count_as_others(outside: int) -> None:
    reading = stalls.machine_contention(CORES, seconds=1.5, threads=CORES)
    assert reading.others >= stalls.CROWDED and reading.crowded
    assert reading.own < stalls.CROWDED  # this process slept
    assert reading.as_dict()["crowded"] is True
    assert "other processes kept" in reading.describe()


def test_a_child_counts_as_this_runs_own(inside: subprocess.Popen[bytes]) -> None:
    """The control: the same work as a child of this process (as a miner worker is) is
    counted as the run's own CPU, not as competition."""
    before = stalls.cpu_sample()
    time.sleep(1.5)
    reading = stalls.contention_between(before, stalls.cpu_sample(), CORES, CORES)
    assert reading.own > 0.1
    child_cpu = sum(stalls.psutil.Process(inside.pid).cpu_times()[:2])
    assert child_cpu > 0


def test_the_watch_names_a_crowded_machine_and_what_to_do(outside: int) -> None:
    """Step durations are the input (the start's steps, then 10x longer ones); the contention
    is read for real beside the competitor, over the half second before the step that ends
    each phase."""
    watch = stalls.StallWatch(CORES, threads=CORES, every=0.2, advice=stalls.what_to_do(2))
    lines = [watch.step(0.01) for _ in range(stalls.SKIP + stalls.START)]
    lines += [watch.step(0.1) for _ in range(stalls.WINDOW)]
    time.sleep(0.5)
    lines.append(watch.step(0.1))
    named = [line for line in lines if line]
    assert len(named) == 1 and named[0].startswith("the machine is oversubscribed: ")
    assert "steps take 10.0x their time at the start" in named[0]
    assert "other processes kept" in named[0]
    assert "--threads 1" in named[0] or "OMP_WAIT_POLICY=PASSIVE" in named[0]
    beat = watch.as_dict()
    assert beat["oversubscribed"] and beat["slowdown"] == 10.0 and beat["cores"] == CORES
    later = [watch.step(0.01) for _ in range(stalls.WINDOW)]
    time.sleep(0.5)
    later.append(watch.step(0.01))
    cleared = [line for line in later if line]
    assert cleared and cleared[-1].startswith("the machine is no longer oversubscribed")
    assert not watch.as_dict()["oversubscribed"]


def test_step_times_find_stalls_against_the_recent_median() -> None:
    times = stalls.StepTimes()
    for _ in range(stalls.SKIP + stalls.START):
        assert not times.add(0.02)
    assert times.start_median() == 0.02 and times.slowdown() == 1.0
    assert times.add(0.2)  # 10x the recent median: a stall
    assert not times.add(0.05)  # 2.5x: slower, not a stall
    assert times.stalls == 1


def test_the_doctor_names_a_crowded_machine(outside: int) -> None:
    finding = check_machine_load(stalls.machine_contention(CORES, seconds=1.5))
    assert finding.status == "warn" and "the machine is oversubscribed" in finding.evidence
    assert finding.details["others_cores"] >= stalls.CROWDED


def test_the_doctor_warns_of_spinning_threads() -> None:
    assert check_wait_policy({}).status == "ok"
    assert check_wait_policy({"OMP_WAIT_POLICY": "passive"}).status == "ok"
    spinning = check_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"})
    assert spinning.status == "warn" and "unset it" in spinning.action
    assert check_wait_policy({"GOMP_SPINCOUNT": "300000"}).status == "warn"


def test_a_run_beside_a_competitor_records_the_contention(outside: int, tmp_path: Path) -> None:
    """The trainer's heartbeat carries its last reading, taken beside a real competitor
    (outside its process tree); any verdict it logged is in metrics.jsonl with its words."""
    import json

    from tests.processes import run_twotower
    from twotower.run.rundir import read_metrics

    out = tmp_path / "run"
    done = run_twotower(
        "train",
        "--demo",
        "--no-supervise",
        "--steps",
        "500",
        "--eval-every",
        "0",
        "--max-eval",
        "50",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    reading = json.loads((out / "heartbeat.json").read_text())["contention"]
    assert reading["cores"] == CORES and reading["others_cores"] >= stalls.CROWDED
    assert reading["crowded"] and reading["threads"] == 1  # the demo's steps: too small to split
    for event in read_metrics(out / "metrics.jsonl"):
        if event["event"] == "contention" and event["oversubscribed"]:
            assert event["message"].startswith("the machine is oversubscribed: load average")

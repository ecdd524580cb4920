"""The supervisor with real faults in real child processes: every kind at every phase ends in
a finished run and a report that names the signal and the phase; a killed and restarted run is
bitwise equal to one never killed; an engine that keeps crashing is switched; restarts run
out with exit code 3; a hang is caught by the watchdog with the trainer's stack; SIGTERM
checkpoints and exits 130. The report's reasoning (forensics.likely_causes) is checked on
outcomes built by hand at the end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import twotower
from tests.processes import REPO, child_env, run_twotower
from tests.runs import STEPS, TRAIN_ARGS, assert_same_state, step_digests
from twotower import backends, miners
from twotower.cli import build_parser, config_from_args
from twotower.data import synthesize
from twotower.guard.evidence import MemoryTrend
from twotower.guard.forensics import ChildOutcome, crashing_thread_first, likely_causes
from twotower.guard.monitor import STACK_WAIT
from twotower.process.exit_status import ExitStatus
from twotower.run.heartbeat import read_heartbeat
from twotower.run.records import Beat
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint

SUPERVISED_ARGS = tuple(arg for arg in TRAIN_ARGS if arg != "--no-supervise")
IN_PROCESS = ("--miner-isolation", "none")  # the miner in the trainer: its crash is the trainer's
EXPECTED_EXIT = {"segv": "SIGSEGV", "abort": "SIGABRT", "kill": "SIGKILL", "raise": None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=300, bank=300, dim=16, seq_len=6, seed=1)
    return path


def train_args(dataset: Path, out: Path, backend: str, *extra: str) -> list[str]:
    """The arguments of `twotower train` for the small run of tests/test_resume.py."""
    return ["train", "--data", str(dataset), "--out", str(out), "--backend", backend, *extra]


def train(dataset: Path, out: Path, backend: str, *extra: str, **env: str):
    """`twotower train` (supervised) in a child started without PYTHONUNBUFFERED."""
    return run_twotower(*train_args(dataset, out, backend, *SUPERVISED_ARGS, *extra), **env)


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """backend -> a run never killed (--no-supervise), made on first use."""
    runs: dict[str, Path] = {}

    def run_for(backend: str) -> Path:
        if backend not in backends.available():
            pytest.skip(f"{backend} is not available")
        if backend not in runs:
            out = tmp_path_factory.mktemp("straight") / backend
            result = train(dataset, out, backend, "--no-supervise")
            assert result.returncode == 0, result.stderr
            runs[backend] = out
        return runs[backend]

    return run_for


def events(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == name]


def report(run: Path, attempt: int) -> dict:
    return json.loads((run / "crashes" / f"attempt-{attempt}.json").read_text())


def assert_reports_fault(run: Path, attempt: int, kind: str, phase: str, step: int) -> dict:
    """The crash report of `attempt` names the signal (or exit code 1), phase, step and fault."""
    found = report(run, attempt)
    if EXPECTED_EXIT[kind] is None:
        assert found["exit"]["code"] == 1 and found["exit"]["signal"] is None
        assert "InjectedFault" in found["python_traceback"]
    else:
        assert found["exit"]["signal"] == EXPECTED_EXIT[kind], found["exit"]
        assert EXPECTED_EXIT[kind] in found["exit"]["description"]
    assert (found["where"]["phase"], found["where"]["step"]) == (phase, step)
    assert found["causes"][0]["confidence"] == "certain"
    assert f"{kind}@{phase}:{step}" in found["causes"][0]["cause"]
    return found


def test_a_segfault_and_an_exception_are_reported_and_the_run_finishes(
    dataset: Path, uninterrupted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the library call: RunResult.attempts has one summary per child."""
    monkeypatch.setenv("TWOTOWER_INJECT_FAULT", "segv@step:12,raise@checkpoint:21")
    args = train_args(dataset, tmp_path / "run", "numpy", *SUPERVISED_ARGS)
    result = twotower.supervise(config_from_args(build_parser().parse_args(args)))
    assert (result.exit_code, result.steps) == (0, STEPS)
    assert [a["signal"] for a in result.attempts] == ["SIGSEGV", None, None]
    assert [a["returncode"] for a in result.attempts] == [-11, 1, 0]
    assert [(a["phase"], a["step"]) for a in result.attempts[:2]] == [
        ("step", 12),
        ("checkpoint", 21),
    ]
    segv = assert_reports_fault(result.run_dir, 1, "segv", "step", 12)
    assert "_train_step" in segv["stacks"] and "Segmentation fault" in segv["stacks"]
    assert segv["memory"]["peak_rss_kb"] > 0 and segv["memory"]["samples"]
    assert_reports_fault(result.run_dir, 2, "raise", "checkpoint", 21)
    restarts = events(result.run_dir, "restart")
    assert [(r["attempt"], r["from_step"]) for r in restarts] == [(2, 7), (3, 14)]
    assert "restart from step 7" in (result.run_dir / "log.txt").read_text()
    assert_same_state(result.run_dir, uninterrupted("numpy"))


# Each kind at each phase: one run per row, the faults firing once each, in order. Refreshes
# are taken (encode, then mine: the exact miner searches at once, in the trainer) at 6 and 16,
# before that step trains; the one for step 30, the run's end, is never taken.
MATRIX = {
    "segv-load": "segv@load:0,abort@encode:6,raise@mine:16,kill@step:16,segv@checkpoint:28",
    "abort-load": "abort@load:0,kill@encode:6,segv@mine:16,raise@step:16,abort@checkpoint:28",
    "kill-load": "kill@load:0,raise@encode:6,abort@mine:16,segv@step:16,kill@checkpoint:28",
    "raise-load": "raise@load:0,segv@encode:6,kill@mine:16,abort@step:16,raise@checkpoint:28",
}


@pytest.mark.slow
@pytest.mark.parametrize("armed", MATRIX.values(), ids=MATRIX.keys())
def test_every_kind_at_every_phase(
    dataset: Path, uninterrupted, tmp_path: Path, armed: str
) -> None:
    out = tmp_path / "run"
    result = train(dataset, out, "numpy", "--max-restarts", "5", TWOTOWER_INJECT_FAULT=armed)
    assert result.returncode == 0, result.stderr
    for attempt, fault in enumerate(armed.split(","), start=1):
        kind, _, point = fault.partition("@")
        phase, step = point.split(":")
        assert_reports_fault(out, attempt, kind, phase, int(step))
    assert len(events(out, "restart")) == 5
    assert sorted(step_digests(out)) == list(range(1, STEPS + 1))
    assert_same_state(out, uninterrupted("numpy"))  # restarts from checkpoints change nothing


@pytest.mark.parametrize("backend", ["numpy", pytest.param("torch-cpu", marks=pytest.mark.slow)])
def test_a_killed_run_restarted_by_the_supervisor_is_bitwise_equal(
    dataset: Path, uninterrupted, tmp_path: Path, backend: str
) -> None:
    straight_run = uninterrupted(backend)
    out = tmp_path / "run"
    result = train(dataset, out, backend, TWOTOWER_INJECT_FAULT="kill@step:12")
    assert result.returncode == 0, result.stderr
    assert "killed by SIGKILL" in result.stderr and "phase step at step 12" in result.stderr
    assert report(out, 1)["causes"][0]["cause"] == "injected fault kill@step:12"
    assert_same_state(out, straight_run)
    straight = {step: digests[0] for step, digests in step_digests(straight_run).items()}
    for step, digests in step_digests(out).items():
        assert set(digests) == {straight[step]}, f"step {step} trained on another batch"


@pytest.mark.slow
@pytest.mark.skipif("torch-cpu" not in backends.available(), reason="needs torch")
def test_an_engine_that_keeps_crashing_is_switched(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fault = "segv@step:15:torch-cpu"
    result = train(dataset, out, "torch-cpu", "--fallback", "numpy", TWOTOWER_INJECT_FAULT=fault)
    assert result.returncode == 0, result.stderr
    crashes = events(out, "crash")
    assert [(c["backend"], c["signal"], c["phase"], c["step"]) for c in crashes] == [
        ("torch-cpu", "SIGSEGV", "step", 15)
    ] * 2
    (switch,) = events(out, "switch")
    assert (switch["role"], switch["previous"], switch["to"]) == ("backend", "torch-cpu", "numpy")
    assert "crashed twice in phase step at step 15" in switch["reason"]
    assert "SIGSEGV" in switch["reason"]
    starts = events(out, "start")
    assert [s["backend"] for s in starts] == ["torch-cpu", "torch-cpu", "numpy"]
    assert load_checkpoint(out)[0]["step"] == STEPS
    assert "switching backend torch-cpu -> numpy" in (out / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.skipif("hnswlib" not in miners.available(), reason="needs hnswlib")
def test_an_in_process_miner_that_keeps_crashing_is_switched(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    miner = ("--miner", "hnswlib", *IN_PROCESS, "--miner-fallback", "exact")
    result = train(dataset, out, "numpy", *miner, TWOTOWER_INJECT_FAULT="segv@mine:6:hnswlib")
    assert result.returncode == 0, result.stderr
    (switch,) = events(out, "switch")
    assert (switch["role"], switch["previous"], switch["to"]) == ("miner", "hnswlib", "exact")
    assert report(out, 1)["where"]["phase"] == "mine"
    assert {m["miner"] for m in events(out, "mined")} == {"exact"}
    assert load_checkpoint(out)[0]["step"] == STEPS


@pytest.mark.slow
@pytest.mark.skipif(
    not {"faiss"} <= set(miners.available()) or "torch-cpu" not in backends.available(),
    reason="needs faiss and torch",
)
def test_a_segfault_with_two_openmp_runtimes_names_the_clash(dataset: Path, tmp_path: Path) -> None:
    """faiss in the trainer's process (isolation none) beside torch: two libgomp copies."""
    out = tmp_path / "run"
    miner = ("--miner", "faiss", *IN_PROCESS)
    result = train(dataset, out, "torch-cpu", *miner, TWOTOWER_INJECT_FAULT="segv@mine:16")
    assert result.returncode == 0, result.stderr
    found = report(out, 1)
    assert found["exit"]["signal"] == "SIGSEGV" and found["where"]["phase"] == "mine"
    assert len(found["openmp"]) >= 2, found["openmp"]
    clash = [c for c in found["causes"] if "OpenMP" in c["cause"]]
    assert clash and clash[0]["confidence"] == "likely"
    assert "--miner-isolation process" in clash[0]["mitigation"]


def test_a_fault_that_always_fires_exhausts_the_restarts(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(
        dataset, out, "numpy", "--max-restarts", "2", TWOTOWER_INJECT_FAULT="abort@step:3:numpy"
    )
    assert result.returncode == 3, result.stderr
    assert "gave up after 2 restarts" in result.stderr
    for attempt in (1, 2, 3):
        assert f"  attempt {attempt} (pid" in result.stderr
        assert_reports_fault(out, attempt, "abort", "step", 3)
    assert report(out, 3)["next"].startswith("give up")
    (gave_up,) = events(out, "gave-up")
    assert (gave_up["attempts"], gave_up["restarts"]) == (3, 2)
    assert len(events(out, "restart")) == 2


@pytest.mark.slow
def test_a_hang_is_caught_by_the_watchdog_with_its_stack(dataset: Path, tmp_path: Path) -> None:
    timeout = 2.0
    out = tmp_path / "run"
    started = time.monotonic()
    result = train(
        dataset, out, "numpy", "--hang-timeout", str(timeout), TWOTOWER_INJECT_FAULT="hang@step:12"
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    found = report(out, 1)
    assert found["exit"]["signal"] == "SIGKILL" and "watchdog" in found["exit"]["description"]
    assert (found["where"]["phase"], found["where"]["step"]) == ("step", 12)
    assert timeout <= found["watchdog"]["silent_s"] < timeout + 1  # noticed within the timeout
    assert found["where"]["heartbeat_age_s"] < timeout + STACK_WAIT  # last heartbeat to the kill
    for frame in ("in trigger", "in enter", "in _train_step", "in train"):
        assert frame in found["stacks"], frame
    assert found["causes"][0]["cause"] == "injected fault hang@step:12"
    assert any(c["cause"].startswith("a hang") for c in found["causes"])
    assert "dumping its stacks" in (out / "log.txt").read_text()
    assert load_checkpoint(out)[0]["step"] == STEPS


def wait_for_step(run: Path, step: int) -> dict:
    """The trainer's heartbeat once it has passed `step` (fails after 120 s)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        beat = read_heartbeat(run / "heartbeat.json") or {}
        if beat.get("step", 0) >= step:
            return beat
        time.sleep(0.1)
    raise AssertionError(f"no heartbeat past step {step}")


def test_sigterm_to_the_supervisor_checkpoints_and_exits_130(dataset: Path, tmp_path: Path) -> None:
    """SIGTERM to the supervisor (once its child's heartbeat passes step 5) is forwarded."""
    out = tmp_path / "run"
    args = train_args(dataset, out, "numpy", *SUPERVISED_ARGS, "--steps", "100000")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "twotower", *args], env=child_env(), cwd=REPO, stderr=subprocess.PIPE
    )
    wait_for_step(out, 5)
    supervisor.send_signal(signal.SIGTERM)
    _, stderr = supervisor.communicate(timeout=120)
    assert supervisor.returncode == 130, stderr
    (interrupted,) = events(out, "interrupted")
    assert interrupted["signal"] == "SIGTERM"
    assert load_checkpoint(out)[0]["step"] == interrupted["step"] == max(step_digests(out))
    assert not events(out, "crash") and not list((out / "crashes").glob("*.json"))


def test_a_trainer_whose_supervisor_is_killed_checkpoints_and_stops(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = train_args(dataset, out, "numpy", *SUPERVISED_ARGS, "--steps", "100000")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "twotower", *args], env=child_env(), cwd=REPO
    )
    beat = wait_for_step(out, 5)
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not events(out, "interrupted"):
        time.sleep(0.1)
    (stopped,) = events(out, "interrupted")
    assert load_checkpoint(out)[0]["step"] == stopped["step"] >= beat["step"]
    assert f"the supervisor (pid {supervisor.pid}) is gone" in (out / "log.txt").read_text()


def test_bad_input_is_final_and_touches_nothing(dataset: Path, tmp_path: Path) -> None:
    """A fresh run into a directory with checkpoints is refused once (exit 2), not retried."""
    out = tmp_path / "run"
    first = train(dataset, out, "numpy", "--steps", "7")
    assert first.returncode == 0, first.stderr
    before = (out / "metrics.jsonl").read_text()
    again = train(dataset, out, "numpy", "--steps", "7")
    assert again.returncode == 2
    assert "already holds checkpoints" in again.stderr and "Traceback" not in again.stderr
    assert (out / "metrics.jsonl").read_text() == before
    assert not list((out / "crashes").glob("*.json"))


def test_a_nan_step_is_not_a_crash(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(dataset, out, "numpy", "--steps", "6", TWOTOWER_INJECT_FAULT="nan@step:3")
    assert result.returncode == 0, result.stderr
    assert [s["step"] for s in events(out, "nonfinite")] == [4]
    assert not list((out / "crashes").glob("*.json")) and not events(out, "restart")


def test_unknown_fallback_names_are_refused_up_front(dataset: Path, tmp_path: Path) -> None:
    result = train(dataset, tmp_path / "run", "numpy", "--fallback", "nmupy")
    assert result.returncode == 2
    assert "unknown backend nmupy" in result.stderr and "Traceback" not in result.stderr


# --- the reasoning, on outcomes built by hand ----------------------------------------------

LIMITS = {"limit_kb": 16 * 1024 * 1024, "limit_source": "cgroup memory.max", "kernel_log": []}


def outcome(returncode: int, heartbeat: dict | None = None, **fields) -> ChildOutcome:
    """A child's end as the monitor records it; `heartbeat` is its last heartbeat.json."""
    beat = Beat.from_dict({"pid": 1234, **heartbeat}) if heartbeat is not None else None
    return ChildOutcome(
        ["python"], 1234, ExitStatus(returncode), 0.0, 10.0, heartbeat=beat, **fields
    )


def test_sigkill_near_the_memory_limit_is_likely_memory_pressure() -> None:
    trend = MemoryTrend()
    for second in range(10):
        trend.add(second, (10 + second * 0.6) * 1024 * 1024, step=second * 100)
    near = likely_causes(outcome(-9, memory=trend, peak_rss_kb=15 * 1024 * 1024), LIMITS)
    assert near[0].confidence == "likely" and "memory pressure" in near[0].cause
    assert "96% of 16.00 GB" in near[0].evidence[0]  # the sampled peak, 15.4 GB
    far = likely_causes(outcome(-9, peak_rss_kb=1024 * 1024), LIMITS)
    assert far[0].confidence == "possible"  # negative control: far from the limit
    counted = likely_causes(outcome(-9, peak_rss_kb=1024 * 1024, oom_kills=1), LIMITS)
    assert counted[0].confidence == "likely"


def test_native_crash_causes_follow_the_evidence() -> None:
    beat = {"phase": "step", "step": 117, "backend": "torch-mps", "miner": "faiss"}
    mps = likely_causes(outcome(-11, heartbeat=beat), LIMITS)
    assert [c.cause.split(":")[0] for c in mps] == ["an MPS kernel bug"]
    assert "--gru-path masked" in mps[0].mitigation
    runtimes = ["/a/libomp.dylib", "/b/libiomp5.dylib"]
    mining = {**beat, "phase": "mine", "backend": "torch-cpu"}
    clash = likely_causes(outcome(-6, heartbeat=mining, openmp=runtimes), LIMITS)
    assert "two OpenMP runtimes" in clash[0].cause and "faiss" in clash[1].cause
    plain = likely_causes(outcome(-11, heartbeat={**beat, "backend": "numpy"}), LIMITS)
    assert [c.confidence for c in plain] == ["possible"]  # nothing points anywhere


def test_the_crashing_thread_comes_first() -> None:
    stacks = (
        "Fatal Python error: Segmentation fault\n\n"
        'Thread 0x1 (most recent call first):\n  File "a.py", line 1 in worker\n\n'
        'Current thread 0x2 (most recent call first):\n  File "b.py", line 2 in step\n\n'
        "Extension modules: numpy (total: 1)\n"
    )
    lines = crashing_thread_first(stacks)
    assert lines[0] == "Fatal Python error: Segmentation fault"
    assert lines[1].startswith("Current thread") and "in step" in lines[2]
    assert not any("Extension modules" in line for line in lines)

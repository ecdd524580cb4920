"""What supervision costs: steady-state steps/s of `twotower train` supervised against
`--no-supervise` on the same work (target: at most 2% slower), and the time from a crash
to the first step after the restart.

The trainer always runs in a fresh `python -m twotower train` child (no
PYTHONUNBUFFERED, output captured): started by this process with --no-supervise,
or by `twotower.supervise` called here (so the supervisor's own CPU time, as a
share of one core, is measured too). Demo-sized data: torch-cpu, GRU D=64 H=128,
B=32, K=8 (no mining inside the measured steps), Q=1024. Each round runs both modes
back to back; a run's step rate is its mean over the steady steps (every step after
the first WARMUP, from the step records' timestamps in metrics.jsonl: a mean,
because those are rounded to 1 ms).

Restart latency: a supervised run killed (SIGKILL, injected) at step KILL_AT; from
the last step record before the crash to the first one after the restart, split
into detection + report, the new child's start-up (imports, data, engines, restore)
and its first step.

    pytest bench/test_supervisor.py --benchmark-only
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from bench.report import RatioReport
from tests.processes import run_twotower
from twotower import supervise
from twotower.cli import build_parser, config_from_args
from twotower.data import Dataset, synthesize
from twotower.process.memory import process_memory
from twotower.run.rundir import read_metrics

STEPS = 400
WARMUP = 20
ROUNDS = 3
KILL_AT = 200
BACKEND = "torch-cpu"
ARGS = (
    f"--backend {BACKEND} --steps {STEPS} --hidden 128 --batch-size 32 --hard-negatives 8 "
    f"--mine-every {10**9} --queue-size 1024 --checkpoint-every 100 --max-eval 64"
).split()


REPORT_TITLE = f"supervisor: steady-state step, {BACKEND}, D=64 H=128 B=32 K=8 Q=1024"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return synthesize(
        tmp_path_factory.mktemp("data") / "demo-sized", samples=4000, bank=10_000, dim=64
    )


def train_args(dataset: Dataset, out: Path) -> list[str]:
    return ["train", "--data", str(dataset.path), "--out", str(out), *ARGS]


def train(dataset: Dataset, out: Path, *extra: str, **env: str) -> list[dict]:
    """A `twotower train` child with ARGS; its metrics records."""
    result = run_twotower(*train_args(dataset, out), *extra, **env)
    assert result.returncode == 0, result.stderr
    return read_metrics(out / "metrics.jsonl")


def seconds_per_step(records: list[dict]) -> float:
    """Mean interval between the step records after the first WARMUP."""
    times = [r["time"] for r in records if r["event"] == "step"][WARMUP:]
    return (times[-1] - times[0]) / (len(times) - 1)


def supervised_in_process(dataset: Dataset, out: Path) -> tuple[list[dict], float]:
    """`twotower.supervise` called here, so this process is the supervisor: its records, and
    its own CPU seconds per wall second while it supervised."""
    args = build_parser().parse_args(
        ["train", "--data", str(dataset.path), "--out", str(out), *ARGS]
    )
    before, started = cpu_seconds(), time.perf_counter()
    assert supervise(config_from_args(args)).exit_code == 0
    cpu, wall = cpu_seconds() - before, time.perf_counter() - started
    return read_metrics(out / "metrics.jsonl"), cpu / wall


def cpu_seconds() -> float:
    """This process's user + system CPU seconds, from the one reader (`twotower.process.memory`)."""
    reading = process_memory()
    assert reading is not None
    return float(reading["cpu_s"])


def test_supervision_overhead(
    benchmark, report: RatioReport, dataset: Dataset, tmp_path: Path
) -> None:
    """Each round runs both modes back to back, so load from elsewhere hits both alike."""
    per_step: dict[str, list[float]] = {"--no-supervise": [], "supervised": []}
    supervisor_cpu: list[float] = []

    def one_round() -> None:
        plain = train(dataset, tmp_path / f"plain-{len(supervisor_cpu)}", "--no-supervise")
        records, cpu = supervised_in_process(
            dataset, tmp_path / f"supervised-{len(supervisor_cpu)}"
        )
        per_step["--no-supervise"].append(seconds_per_step(plain))
        per_step["supervised"].append(seconds_per_step(records))
        supervisor_cpu.append(cpu)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    for mode, rates in per_step.items():
        median = statistics.median(rates)
        extra = {"supervisor_cpu": f"{statistics.median(supervisor_cpu):.2%}"}
        report.add(
            mode,
            benchmark,
            baseline=None if mode.startswith("--") else "--no-supervise",
            median_s=median,
            steps_per_s=round(1 / median, 1),
            rounds=" ".join(f"{1 / rate:.1f}" for rate in rates),
            **(extra if mode == "supervised" else {}),
        )


def test_crash_to_first_step_after_restart(
    benchmark, report: RatioReport, dataset: Dataset, tmp_path: Path
) -> None:
    latencies: list[dict[str, float]] = []

    def crash_and_restart() -> None:
        out = tmp_path / f"run-{len(latencies)}"
        records = train(dataset, out, TWOTOWER_INJECT_FAULT=f"kill@step:{KILL_AT}")
        crash = next(i for i, r in enumerate(records) if r["event"] == "crash")
        last_step = [r for r in records[:crash] if r["event"] == "step"][-1]
        after = records[crash:]
        start = next(r for r in after if r["event"] == "start")
        first_step = next(r for r in after if r["event"] == "step")
        latencies.append(
            {
                "total": first_step["time"] - last_step["time"],
                "detect+report": records[crash]["time"] - last_step["time"],
                "start-up": start["time"] - records[crash]["time"],
                "first step": first_step["time"] - start["time"],
            }
        )

    benchmark.pedantic(crash_and_restart, rounds=ROUNDS, iterations=1)
    median = {k: round(statistics.median(x[k] for x in latencies), 3) for k in latencies[0]}
    report.add(
        f"crash -> first step after restart ({BACKEND})",
        benchmark,
        median_s=median.pop("total"),
        **{k.replace(" ", "_"): f"{v}s" for k, v in median.items()},
    )

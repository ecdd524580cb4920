"""A busy machine: the trainer's wall (first to last step) with each OpenMP wait policy, on the
machine as it is and beside a competing 2-thread BLAS job, as ratios to `--threads 1` beside
the same competitor.

Each case is a trainer child (`twotower train --no-supervise`, torch-cpu), since an OpenMP
runtime reads its wait policy once, when it loads. Cases:

- `--threads 1`: the baseline (one thread has no partner to wait for);
- PASSIVE: twotower's default (`twotower.process.wait_policy`): idle threads sleep;
- spin 300k (GOMP_SPINCOUNT=300000, GNU OpenMP's own default): what a run had before;
- spin 10k (GOMP_SPINCOUNT=10000): a short spin, the middle candidate.

Shapes: the demo's (`--demo`: GRU H=128 over the demo's data, B=32, Q=1024) and the seed's
(GRU D=H=768, B=32, Q=50k). The competitor is a NumPy loop multiplying 1500 x 1500 matrices
with OPENBLAS_NUM_THREADS=2, started as a subprocess before the case and killed by its PID
after. "quiet" is the machine without it (whatever else runs on it: the table records the
load average). Targets: busy, default <= 1.5x `--threads 1`; quiet, default <= 1.05x.

    pytest bench/test_busy_machine.py --benchmark-only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.report import RatioReport
from twotower import backends
from twotower.data import synthesize
from twotower.process import wait_policy
from twotower.run.rundir import read_metrics

REPO = Path(__file__).resolve().parent.parent
REPORT_TITLE = "busy machine: trainer wall (first to last step) by OpenMP wait policy"
COMPETITOR = "import numpy as np\na = np.random.rand(1500, 1500)\nwhile True:\n    a @ a\n"
SHAPES = {  # name: (steps, arguments after `twotower train`)
    "demo": (60, ["--demo"]),
    "seed": (12, "--hidden 768 --batch-size 32 --queue-size 50000 --hard-negatives 0".split()),
}
CASES = {  # name: (environment added, extra arguments)
    "threads 1": ({}, ["--threads", "1"]),
    "PASSIVE (default)": ({}, []),
    "spin 300k": ({"GOMP_SPINCOUNT": "300000"}, []),
    "spin 10k": ({"GOMP_SPINCOUNT": "10000"}, []),
}

pytestmark = pytest.mark.skipif("torch-cpu" not in backends.available(), reason="needs torch")


@pytest.fixture(scope="module")
def seed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "seed-shape"
    synthesize(path, samples=3000, bank=60_000, dim=768, seq_len=10, seed=0)
    return path


@pytest.fixture(scope="module", params=["quiet", "busy"])
def load(request: pytest.FixtureRequest) -> Iterator[str]:
    """'quiet': the machine as it is; 'busy': a 2-thread BLAS competitor runs meanwhile."""
    if request.param == "quiet":
        yield "quiet"
        return
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
    time.sleep(1.0)  # its matrices made, it multiplies
    try:
        yield "busy"
    finally:
        competitor.kill()
        competitor.wait()


def trainer_wall(out: Path, steps: int, arguments: list[str], env: dict[str, str]) -> float:
    """Run the trainer in a child; its wall from the first step's record to the last's."""
    command = [sys.executable, "-m", "twotower", "train", "--no-supervise", "--out", str(out)]
    command += [*arguments, "--steps", str(steps), "--eval-every", "0", "--max-eval", "64"]
    command += ["--checkpoint-every", "1000000"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    times = [r["time"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert len(times) == steps
    return times[-1] - times[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_trainer_wall_by_wait_policy(
    benchmark,
    report: RatioReport,
    seed_data: Path,
    load: str,
    shape: str,
    case: str,
    tmp_path: Path,
) -> None:
    steps, arguments = SHAPES[shape]
    if shape == "seed":
        arguments = ["--data", str(seed_data), *arguments]
    added, extra = CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in wait_policy.USER_CHOICES}
    env.pop(wait_policy.SET_BY_TWOTOWER, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(added)
    walls: list[float] = []

    def once() -> None:
        walls.append(trainer_wall(tmp_path / f"run-{len(walls)}", steps, arguments + extra, env))

    benchmark.pedantic(once, rounds=1, iterations=1)
    label = f"{shape} {load}: {case}"
    report.add(
        label,
        benchmark,
        baseline=None if case == "threads 1" else f"{shape} {load}: threads 1",
        median_s=walls[0] / (steps - 1),  # per step, first to last
        steps=steps,
        load_avg=f"{os.getloadavg()[0]:.1f}",
    )
    print(json.dumps({"case": label, "wall_s": round(walls[0], 3)}))

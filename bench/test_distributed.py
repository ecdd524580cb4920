"""2 torchrun ranks (gloo, CPU) against 1 process at the same global batch: the seed's shape,
GRU D = H = 768, B = 32 (16 rows per rank), T = 10, K = 8 hard negatives, Q = 4096.

Both runs are `twotower train` in child processes, on identical batches; each one's step
time is the median interval between consecutive `step` records of its metrics.jsonl
(rank 0's for the ranks: every rank waits for the others in each collective). The ranks
log each step's time in collectives (`collective_ms`: the all-gather of positives plus the
all-reduce of the 4.7M gradients, ~19 MB). Each rank's thread budget is its share of the
machine's cores (1 of 2); the 1-process run is measured with 2 threads and with 1 (the same
compute per process as a rank). On a 2-core machine no speed-up is expected: the figure is
what the exchange costs.

    pytest bench/test_distributed.py --benchmark-only
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.report import RatioReport
from tests.processes import REPO, child_env
from twotower import backends
from twotower.data import Dataset, synthesize
from twotower.run.rundir import read_metrics

pytestmark = pytest.mark.skipif(
    "torch-cpu" not in backends.available(), reason="torch.distributed needs torch"
)

STEPS = 30
B, D, H, T, K, Q = 32, 768, 768, 10, 8, 4096
REPORT_TITLE = "distributed: step, 2 gloo ranks vs 1 process, GRU B=32 T=10 D=H=768 K=8 Q=4096"
TRAIN_ARGS = (
    f"--backend torch-cpu --steps {STEPS} --batch-size {B} --hidden {H} --hard-negatives {K} "
    f"--mine-every 1000000 --queue-size {Q} --checkpoint-every 1000000 --max-eval 64"
).split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return synthesize(
        tmp_path_factory.mktemp("data") / "seed-shape", samples=2000, bank=20_000, dim=D, seq_len=T
    )


def run(command: list[str], **env: str) -> None:
    result = subprocess.run(
        command, env=child_env(**env), capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-4000:]


def steady_step(out: Path) -> tuple[float, list[dict]]:
    """Median seconds between consecutive steps after two warm-up steps, and the step records."""
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert len(steps) == STEPS
    return float(np.median(np.diff([r["time"] for r in steps])[2:])), steps


@pytest.mark.parametrize("threads", [2, 1])
def test_one_process(
    benchmark, report: RatioReport, dataset: Dataset, tmp_path: Path, threads: int
) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "twotower", "train", "--no-supervise"]
    command += ["--data", str(dataset.path), "--out", str(out), "--threads", str(threads)]
    command += TRAIN_ARGS
    benchmark.pedantic(
        run, args=(command,), kwargs={"OMP_NUM_THREADS": str(threads)}, rounds=1, iterations=1
    )
    case = f"1 process ({threads} thread{'s' if threads > 1 else ''})"
    baseline = None if threads == 2 else "1 process (2 threads)"
    report.add(case, benchmark, baseline=baseline, median_s=steady_step(out)[0])


def test_two_ranks(benchmark, report: RatioReport, dataset: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "twotower", "train", "--data", str(dataset.path), "--out", str(out)]
    benchmark.pedantic(run, args=([*command, *TRAIN_ARGS],), rounds=1, iterations=1)
    median, steps = steady_step(out)
    collective = float(np.median([r["collective_ms"] for r in steps[2:]]))
    report.add(
        "2 ranks x 1 thread (gloo)",
        benchmark,
        baseline="1 process (1 thread)",
        median_s=median,
        collective_ms=round(collective, 1),
        collective_share=f"{collective / 1e3 / median:.0%}",
    )

"""What negatives from the whole bank cost at the seed's shape: a 771k x 768 bank (2.37 GB,
memory-mapped), GRU H=768, B=32, Q=4096, torch-cpu with one thread. Same-run ratios: the step
with S=8192 sampled rows and the step with the full softmax, each over the step without bank
negatives; and the full path's memory (peak RSS; anonymous vs file-backed: the bank's pages
are the map's, never a copy). Each mode runs in a fresh process (bench/bank_cost_child.py).

    pytest bench/test_bank_cost.py --benchmark-only -s
    (TWOTOWER_BENCH_BANK_ROWS=100000 for a smaller bank)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench.report import RatioReport
from twotower.data import Dataset, synthesize

REPORT_TITLE = "bank negatives: step time at B=32 H=768 D=768 Q=4096, torch-cpu 1 thread"
ROWS = int(os.environ.get("TWOTOWER_BENCH_BANK_ROWS", "771000"))
STEPS = {"none": 12, "sampled": 12, "full": 4}  # the first step of each is dropped (warm-up)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    path = tmp_path_factory.mktemp("data") / "seed-bank"
    return synthesize(path, samples=2000, bank=ROWS, dim=768, seq_len=10)


def run_child(dataset: Dataset, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bench.bank_cost_child", str(dataset.path), mode]
    done = subprocess.run(
        [*command, str(STEPS[mode])], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["none", "sampled", "full"])
def test_step_with_bank_negatives(
    benchmark, report: RatioReport, dataset: Dataset, mode: str
) -> None:
    result = benchmark.pedantic(lambda: run_child(dataset, mode), rounds=1, iterations=1)
    median = float(np.median(result["seconds"][1:]))
    gib = 1 << 30
    memory = {key: f"{result[key] / gib:.2f}GiB" for key in ("peak_rss", "rss_anon", "rss_file")}
    report.add(
        f"{mode} (M={ROWS:,})",
        benchmark,
        baseline=None if mode == "none" else f"none (M={ROWS:,})",
        median_s=median,
        **memory,
    )
    if mode == "full":  # bounded: anonymous memory is the model and chunks, not the bank
        assert result["rss_anon"] < 0.5 * ROWS * 768 * 4 + (1 << 30)

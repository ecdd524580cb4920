"""Peak memory of a training run with mining: the bank and data stay file-backed.

A child runs `twotower train` (torch-cpu, GRU D=H=768, K=8, a 50k queue, 20 steps,
mining at step 10 by exact search over the whole bank, a checkpoint at 10 and 20)
while this process samples its /proc status every 20 ms. The claim: the child's
anonymous memory (RssAnon: heap, torch, queue, model; not the mapped bank)
stays below 1 GB plus the model's and the queue's own size, however big the bank.

    pytest bench/test_memory.py                               # 100k x 768 bank (293 MiB)
    TWOTOWER_BENCH_SEED_SCALE=1 pytest bench/test_memory.py   # 771k x 768 (2.2 GiB)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.report import RatioReport
from twotower.data import synthesize
from twotower.memory import proc_status

SEED_SCALE = os.environ.get("TWOTOWER_BENCH_SEED_SCALE", "") not in ("", "0")
BANK = 771_000 if SEED_SCALE else 100_000
D = H = 768
QUEUE = 50_000
CACHE = Path(os.environ.get("TWOTOWER_BENCH_CACHE", ".benchmarks/cache"))
MIB = 1024 * 1024


REPORT_TITLE = f"memory: 20 steps with mining over a {BANK} x {D} bank, queue {QUEUE}"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_trainer_anonymous_memory_stays_small(
    benchmark, report: RatioReport, tmp_path: Path
) -> None:
    data = synthesize(CACHE / f"memory-bank{BANK}", samples=1200, bank=BANK, dim=D, seq_len=10)
    bank_mib = data.bank.nbytes / MIB
    args = [
        sys.executable,
        "-m",
        "twotower",
        "train",
        "--no-supervise",
        "--data",
        str(data.path),
        "--out",
        str(tmp_path / "run"),
        "--backend",
        "torch-cpu",
        "--hidden",
        str(H),
        "--steps",
        "20",
        "--hard-negatives",
        "8",
        "--mine-every",
        "10",
        "--queue-size",
        str(QUEUE),
        "--checkpoint-every",
        "10",
        "--max-eval",
        "256",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    peaks = {"RssAnon": 0, "RssFile": 0}

    def run() -> int:
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while child.poll() is None:
            status = proc_status(child.pid)
            if status is None:
                break
            for name in peaks:
                peaks[name] = max(peaks[name], status.get(name, 0))
            time.sleep(0.02)
        child.wait()
        return child.returncode

    assert benchmark.pedantic(run, rounds=1, iterations=1) == 0
    model_mib = 3 * 4 * (3 * H * (D + H) + 6 * H + H * D + D) / MIB  # params + two AdamW moments
    queue_mib = QUEUE * (D * 4 + 8) / MIB
    anon_mib, file_mib = peaks["RssAnon"] / 1024, peaks["RssFile"] / 1024
    report.add(
        "trainer child, peak",
        benchmark,
        bank_MiB=round(bank_mib),
        peak_RssAnon_MiB=round(anon_mib),
        peak_RssFile_MiB=round(file_mib),
        model_MiB=round(model_mib),
        queue_MiB=round(queue_mib),
    )
    assert anon_mib < 1024 + model_mib + queue_mib, f"RssAnon peaked at {anon_mib:.0f} MiB"

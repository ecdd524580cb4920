"""Peak memory of a training run with mining: the bank and data stay file-backed.

A child runs `twotower train` (torch-cpu, GRU D=H=768, K=8, a 50k queue, 20 steps,
mining at step 10 by exact search over the whole bank, a checkpoint at 10 and 20)
while this process reads its memory every 20 ms through `twotower.process.memory`. The
claim (Linux, where the reading splits RSS): the child's anonymous memory
(RssAnon: heap, torch, queue, model; not the mapped bank) stays below 1 GB plus
the model's and the queue's own size, however big the bank. On macOS the
reading has no such split: the peak RSS (bank pages included) is reported only.

    pytest bench/test_memory.py                               # 100k x 768 bank (293 MiB)
    TWOTOWER_BENCH_SEED_SCALE=1 pytest bench/test_memory.py   # 771k x 768 (2.2 GiB)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.report import RatioReport
from twotower.data import synthesize
from twotower.process.memory import process_memory

SEED_SCALE = os.environ.get("TWOTOWER_BENCH_SEED_SCALE", "") not in ("", "0")
BANK = 771_000 if SEED_SCALE else 100_000
D = H = 768
QUEUE = 50_000
CACHE = Path(os.environ.get("TWOTOWER_BENCH_CACHE", ".benchmarks/cache"))
MIB = 1024 * 1024


REPORT_TITLE = f"memory: 20 steps with mining over a {BANK} x {D} bank, queue {QUEUE}"


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
    peaks = {"rss": 0, "rss_anon": 0, "rss_file": 0}

    def run() -> int:
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while child.poll() is None:
            reading = process_memory(child.pid)
            if reading is None:
                break
            for name in peaks:
                peaks[name] = max(peaks[name], int(reading.get(name, 0)))
            time.sleep(0.02)
        child.wait()
        return child.returncode

    assert benchmark.pedantic(run, rounds=1, iterations=1) == 0
    model_mib = 3 * 4 * (3 * H * (D + H) + 6 * H + H * D + D) / MIB  # params + two AdamW moments
    queue_mib = QUEUE * (D * 4 + 8) / MIB
    anon_mib, file_mib = peaks["rss_anon"] / MIB, peaks["rss_file"] / MIB
    report.add(
        "trainer child, peak",
        benchmark,
        bank_MiB=round(bank_mib),
        peak_RSS_MiB=round(peaks["rss"] / MIB),
        peak_RssAnon_MiB=round(anon_mib) if anon_mib else "n/a",
        peak_RssFile_MiB=round(file_mib) if file_mib else "n/a",
        model_MiB=round(model_mib),
        queue_MiB=round(queue_mib),
    )
    assert peaks["rss"] > 0
    if sys.platform.startswith("linux"):
        assert anon_mib < 1024 + model_mib + queue_mib, f"RssAnon peaked at {anon_mib:.0f} MiB"

"""What mining costs a run: the wall time of N training steps with mining against the same
N steps with mining off, measured in one run, as a ratio; and per refresh its queries,
encode, search and wait seconds and the recall probe. Runs that follow each other are
only comparable on a quiet machine, so `test_refresh_cost_in_steps` also measures the
same costs interleaved with training steps in one process, where a change of load hits
both alike.

The seed-scale case (TWOTOWER_BENCH_SEED_SCALE=1) is issue 9's: a synthesized
771k x 768 bank, 100k sequences of T = 10, GRU H = 768, B = 32, K = 8, Q = 50k,
faiss IVF4096,Flat in its worker, a refresh every 500 steps, two refresh cycles.
The default case is the same shape scaled down to run in a few minutes.
TWOTOWER_BENCH_MINE_EVERY / TWOTOWER_BENCH_MINING_CYCLES shorten the seed-scale
case on a busy machine; TWOTOWER_BENCH_MINING_CASES picks the mining cases (a
comma-separated subset of CASES; by default the thread budget's overlapped run
and the synchronous one).

The overlapped cases differ only in threads: the budget's default (the trainer
drops to its share while a search runs, then takes every core again), a fixed
split (`--threads` + `--miner-threads` summing to the cores for the whole run),
and every core for both (each library's default).

Each case is a `twotower train` child. Its time is from its first step record to its last
in metrics.jsonl: set-up,
the evaluations before and after and the final checkpoint are outside it; every
refresh inside it (encoding, waiting for the search) is in it. The index is built
(or loaded from the index cache) before the first step; its build or load time and
the time to the first step are reported beside. On a shared machine the wall time
swings with the load, so the CPU seconds of each child (trainer and miner worker, set-up
included) are reported too: their ratio is what mining adds to the work. Each case's
line is appended to .benchmarks/mining-scale.log as soon as it finishes.

    pytest bench/test_mining_scale.py
    TWOTOWER_BENCH_SEED_SCALE=1 pytest bench/test_mining_scale.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.report import RatioReport
from twotower import backends, miners
from twotower.config import TrainConfig
from twotower.data import Dataset, synthesize
from twotower.paths import user_cache_dir
from twotower.process.threads import usable_cores
from twotower.run.rundir import read_metrics
from twotower.training.batching import StepPlan, assemble_batch, gather_step
from twotower.training.evaluation.heldout import held_out_split
from twotower.training.evaluation.metrics import encode_rows
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.queue import MemoryQueue

SEED_SCALE = os.environ.get("TWOTOWER_BENCH_SEED_SCALE", "") not in ("", "0")
CACHE = Path(os.environ.get("TWOTOWER_BENCH_CACHE", ".benchmarks/cache"))
if SEED_SCALE:
    SAMPLES, BANK, D, H, T, Q, INDEX = 100_000, 771_000, 768, 768, 10, 50_000, "IVF4096,Flat"
    MINE_EVERY = int(os.environ.get("TWOTOWER_BENCH_MINE_EVERY", "500"))
    CYCLES = int(os.environ.get("TWOTOWER_BENCH_MINING_CYCLES", "2"))
else:
    SAMPLES, BANK, D, H, T, Q, INDEX = 20_000, 100_000, 128, 128, 10, 4096, "IVF256,Flat"
    MINE_EVERY, CYCLES = 100, 2
B, K = 32, 8
LEAD = MINE_EVERY // 4  # the default --mine-lead
# Measured: steps [FIRST, STEPS), whole refresh cycles from the first refresh's take step, so
# that every refresh taken is also used (the steps before FIRST never pay for mining).
FIRST = MINE_EVERY - LEAD
STEPS = FIRST + CYCLES * MINE_EVERY
LOG = Path(".benchmarks") / "mining-scale.log"  # each case's line as soon as it finishes

REPORT_TITLE = (
    f"mining: steps {FIRST}..{STEPS - 1} ({CYCLES} refreshes every {MINE_EVERY}) vs mining off; "
    f"{BANK} x {D} bank, {SAMPLES} sequences, GRU H={H}, B={B} K={K} Q={Q}, faiss {INDEX}"
)

pytestmark = pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    name = "mining-seed" if SEED_SCALE else f"mining-{SAMPLES}x{BANK}x{D}"
    return synthesize(CACHE / name, samples=SAMPLES, bank=BANK, dim=D, seq_len=T)


def train_args(dataset: Dataset, out: Path, mining: bool, overlap: bool) -> list[str]:
    """`twotower train` arguments of one case: the same steps, mining on or off (its thread
    options are the case's own)."""
    args = f"--no-supervise --backend torch-cpu --steps {STEPS} --batch-size {B} --hidden {H} "
    args += f"--queue-size {Q} --checkpoint-every {10**9} --max-eval 64 --mine-every {MINE_EVERY} "
    args += f"--hard-negatives {K if mining else 0} --miner faiss --faiss-index {INDEX} "
    args += "--mine-overlap" if overlap else "--no-mine-overlap"
    return ["--data", str(dataset.path), "--out", str(out), *args.split()]


def steps_wall(run: Path) -> tuple[float, list[dict[str, Any]]]:
    """(seconds from the end of step FIRST - 1 to the end of the last step, the run's records).

    The step record of step s (1-based in metrics.jsonl) is written when s steps are done.
    """
    records = read_metrics(run / "metrics.jsonl")
    times = {r["step"]: r["time"] for r in records if r["event"] == "step"}
    assert len(times) == STEPS, f"{run}: {len(times)} steps logged"
    return times[STEPS] - times[FIRST], records


def refreshes(records: list[dict[str, Any]]) -> str:
    """One 'use@take: n queries, encode/search/wait s, recall' entry per refresh."""
    parts = []
    for r in records:
        if r["event"] != "mined":
            continue
        recall = f", recall@{r['recall_k']} {r['recall']:.3f} (probe {r['probe_seconds']:.1f} s)"
        parts.append(
            f"[{r['step']}@{r['take']}: {r['queries']} q, encode {r['encode_seconds']:.1f} s, "
            f"search {r['seconds']:.1f} s, wait {r['wait_seconds']:.1f} s"
            + (recall if "recall" in r else "")
            + "]"
        )
    return " ".join(parts)


def run_case(
    dataset: Dataset, out: Path, label: str, threads: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Train case `label` ('off', 'synchronous' or one of the overlapped CASES) in a child,
    with `threads` (its thread options): wall time of its steps, its CPU seconds (trainer
    and miner worker, set-up included), the time to its first step, its records."""
    args = train_args(dataset, out, mining=label != "off", overlap=label != "synchronous")
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    child = subprocess.run(
        [sys.executable, "-m", "twotower", "train", *args, *threads],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the trainer and its miner worker
    assert child.returncode == 0, child.stderr[-2000:]
    wall, records = steps_wall(out)
    first_step = next(r["time"] for r in records if r["event"] == "step")
    case = {"wall": wall, "records": records, "to_first_step": first_step - started}
    case["cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    with LOG.open("a") as log:
        log.write(
            f"{time.strftime('%H:%M:%S')} {label}: steps {FIRST}..{STEPS - 1} in {wall:.1f} s, "
            f"cpu {case['cpu']:.1f} s, first step after {case['to_first_step']:.1f} s; "
            f"{refreshes(records)}\n"
        )
    return case


@pytest.fixture(scope="module")
def mining_off(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_case(dataset, tmp_path_factory.mktemp("off") / "run", "off")


def test_steps_without_mining(benchmark, report: RatioReport, mining_off: dict[str, Any]) -> None:
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    report.add(
        "mining off",
        benchmark,
        median_s=mining_off["wall"] / (STEPS - FIRST),
        cpu_s=round(mining_off["cpu"], 1),
        to_first_step_s=round(mining_off["to_first_step"], 1),
    )


@pytest.fixture
def warm_pages(dataset: Dataset) -> None:
    """Read the bank and the cached IVF,Flat index (the index files at least half the bank's
    size) once, so every mining case starts with their pages in memory: otherwise the first
    case to search pays for reading them from disk (a first search of 25-29 s instead of 12,
    measured) and the comparison depends on the order the cases ran in."""
    bank_file = dataset.path / "bank.npy"
    size = bank_file.stat().st_size
    indexes = (user_cache_dir() / "index").glob("faiss-*.index")
    for path in [bank_file, *(p for p in indexes if p.stat().st_size >= size // 2)]:
        with path.open("rb") as file:
            while file.read(1 << 24):
                pass


def case_threads(case: str) -> tuple[str, ...]:
    """The thread options of a mining case on this machine's cores (`usable_cores`)."""
    cores = usable_cores()
    if case == "overlapped-fixed-split":
        miner = max(1, cores // 2)
        return ("--threads", str(max(1, cores - miner)), "--miner-threads", str(miner))
    if case == "overlapped-every-core":
        return ("--threads", str(cores), "--miner-threads", str(cores))
    return ()


CASES = ("overlapped", "overlapped-fixed-split", "overlapped-every-core", "synchronous")
CHOSEN = os.environ.get("TWOTOWER_BENCH_MINING_CASES", "overlapped,synchronous").split(",")


@pytest.mark.parametrize("case", [case for case in CASES if case in CHOSEN])
def test_steps_with_mining(
    benchmark,
    report: RatioReport,
    dataset: Dataset,
    mining_off: dict[str, Any],
    tmp_path: Path,
    warm_pages: None,
    case: str,
) -> None:
    threads = case_threads(case)
    found = run_case(dataset, tmp_path / "run", case, threads)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    mined = [r for r in found["records"] if r["event"] == "mined"]
    assert len(mined) == CYCLES
    assert all(r["negatives"] > 0 for r in mined)
    report.add(
        f"mining, {case}",
        benchmark,
        baseline="mining off",
        median_s=found["wall"] / (STEPS - FIRST),
        threads=" ".join(threads) or "the budget's default",
        cpu_ratio=round(found["cpu"] / mining_off["cpu"], 3),
        to_first_step_s=round(found["to_first_step"], 1),
        refreshes=refreshes(found["records"]),
    )


ROUNDS, STEPS_PER_ROUND, QUERIES_PER_ROUND = 5, 10, 512


def test_refresh_cost_in_steps(benchmark, report: RatioReport, dataset: Dataset) -> None:
    """Load-proof: in one process, ROUNDS times in turn, STEPS_PER_ROUND training steps, the
    encoding of QUERIES_PER_ROUND refresh queries and their search in the faiss worker, so a
    change of the machine's load hits all three alike. What a refresh costs per step it
    serves is B x (encode + search per query) / step time: the predicted ratio on a machine
    whose cores training already fills (overlap hides the search only on spare cores)."""
    config = TrainConfig(
        data=str(dataset.path), backend="torch-cpu", hidden=H, batch_size=B, queue_size=Q
    )
    backend = backends.make_backend(config, dataset.dim)
    train_rows, _ = held_out_split(
        dataset.num_samples, config.eval_fraction, config.max_eval, config.seed
    )
    plan = StepPlan(train_rows, B, config.seed)
    queue = MemoryQueue(Q, dataset.dim)
    table = HardNegativeTable.empty(dataset.num_samples, config.mine_pool)
    miner = miners.get("faiss", index=INDEX, cache_dir=user_cache_dir() / "index")
    miner.build(dataset.bank, fingerprint=dataset.fingerprint)
    step_s, encode_s, search_s = [], [], []
    step = 0
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            data = gather_step(dataset, step, plan.rows_for(step))
            backend.step(assemble_batch(data, table, queue, dataset.bank, K, config.seed))
            queue.push(data.positive_ids, data.positive_vecs)
            step += 1
        step_s.append((time.perf_counter() - started) / STEPS_PER_ROUND)
        rows = plan.rows_between(step, step + QUERIES_PER_ROUND // B)
        started = time.perf_counter()
        queries = encode_rows(backend, dataset.gather, rows)
        encode_s.append((time.perf_counter() - started) / len(rows))
        started = time.perf_counter()
        miner.search(queries, config.mine_skip + config.mine_pool + 1)
        search_s.append((time.perf_counter() - started) / len(rows))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    per_round = [B * (e + s) / t for t, e, s in zip(step_s, encode_s, search_s, strict=True)]
    encode_share = [B * e / t for t, e in zip(step_s, encode_s, strict=True)]
    report.add(
        "refresh cost per step served",
        benchmark,
        median_s=float(np.median(step_s)),
        predicted_ratio=round(1 + float(np.median(per_round)), 3),
        encode_share=round(float(np.median(encode_share)), 3),
        rounds=" ".join(f"{1 + r:.2f}" for r in per_round),
        encode_ms_per_query=round(1e3 * float(np.median(encode_s)), 2),
        search_ms_per_query=round(1e3 * float(np.median(search_s)), 2),
    )
    with LOG.open("a") as log:
        log.write(
            f"{time.strftime('%H:%M:%S')} interleaved: step {np.median(step_s):.3f} s, encode "
            f"{1e3 * np.median(encode_s):.2f} ms/query, search {1e3 * np.median(search_s):.2f} "
            f"ms/query, predicted ratio per round {[round(1 + r, 3) for r in per_round]}\n"
        )

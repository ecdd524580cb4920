"""Miner benchmarks: build time, time per 1024 queries, QPS and recall@64 against exact for
exact, faiss Flat, faiss HNSW32, faiss IVF and hnswlib on a clustered bank; the machine's
float32 GEMM rate and the exact miner's share of it; peak RSS of a trainer-like process
and of its miner's worker; the per-call cost of running a miner in a worker.

    pytest bench/test_miners.py                               # 100k x 768 (default)
    TWOTOWER_BENCH_SEED_SCALE=1 pytest bench/test_miners.py   # 771k x 768, the seed's bank

The bank is written once as an .npy memory map under $TWOTOWER_BENCH_CACHE (default
.benchmarks/cache), with 1024 queries from the same clusters and their exact top-64.
Indexes are cached there too, so a later run loads them: its build_s then shows the
build that made the index and, in brackets, the load. The seed scale needs about 3 GB
of disk and index builds of tens of minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.report import RatioReport, Row, gemm_gflops
from twotower import miners

DIM = 768
QUERIES = 1024
K = 64
SPREAD = 1.0  # noise norm relative to a cluster centre's: clusters overlap at their edges
ROWS_PER_CLUSTER = 100
CHUNK = 50_000
SEED_SCALE = os.environ.get("TWOTOWER_BENCH_SEED_SCALE", "") not in ("", "0")
ROWS, IVF = (771_000, "IVF4096,Flat") if SEED_SCALE else (100_000, "IVF1024,Flat")
CACHE = Path(os.environ.get("TWOTOWER_BENCH_CACHE", ".benchmarks/cache"))
INDEXES = CACHE / "indexes"
BUILD_TIMES = CACHE / "build-times.json"  # how long each cached index took to build

pytestmark = pytest.mark.skipif(
    not {"faiss", "hnswlib"} <= set(miners.available()), reason="needs faiss and hnswlib"
)


REPORT_TITLE = f"miners: {ROWS} x {DIM} clustered bank, {QUERIES} queries, k={K}"


@dataclass
class Case:
    """The bank (M, DIM) memory map, queries (QUERIES, DIM) and their exact ids (QUERIES, K)."""

    bank: np.ndarray
    bank_path: Path
    queries: np.ndarray
    queries_path: Path
    truth: np.ndarray
    fingerprint: str


def write_clustered(bank_path: Path, queries_path: Path, rows: int, seed: int = 0) -> None:
    """Unit vectors around rows / 100 random centres: the bank in row chunks, then the queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((rows // ROWS_PER_CLUSTER, DIM), dtype=np.float32)

    def draw(n: int) -> np.ndarray:
        noise = SPREAD * rng.standard_normal((n, DIM), dtype=np.float32)
        points = centres[rng.integers(len(centres), size=n)] + noise
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    partial = bank_path.with_suffix(".partial.npy")
    bank = np.lib.format.open_memmap(partial, "w+", np.float32, (rows, DIM))
    for start in range(0, rows, CHUNK):
        bank[start : start + CHUNK] = draw(min(CHUNK, rows - start))
    bank.flush()
    del bank
    os.replace(partial, bank_path)
    np.save(queries_path, draw(QUERIES))


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that `ids` found."""
    found = [len(np.intersect1d(row, ref)) for row, ref in zip(ids, truth, strict=True)]
    return float(np.mean(found)) / truth.shape[1]


def megabytes(value: int) -> str:
    return f"{value / 2**20:.0f}MB"


@pytest.fixture(scope="module")
def case() -> Case:
    CACHE.mkdir(parents=True, exist_ok=True)
    bank_path, queries_path = CACHE / f"bank-{ROWS}x{DIM}.npy", CACHE / f"queries-{ROWS}.npy"
    truth_path = CACHE / f"truth-{ROWS}-k{K}.npy"
    if not bank_path.exists() or not queries_path.exists():
        write_clustered(bank_path, queries_path, ROWS)
        truth_path.unlink(missing_ok=True)
    bank, queries = np.load(bank_path, mmap_mode="r"), np.load(queries_path)
    if not truth_path.exists():
        exact = miners.get("exact")
        exact.build(bank)
        np.save(truth_path, exact.search(queries, K)[1])
    fingerprint = f"bench-clustered-{ROWS}x{DIM}-seed0"
    return Case(bank, bank_path, queries, queries_path, np.load(truth_path), fingerprint)


def test_gemm_peak(benchmark: Any, report: RatioReport) -> None:
    """The machine's float32 GEMM rate, measured in this run."""
    report.peak_gflops = benchmark.pedantic(gemm_gflops, rounds=1, iterations=1)


CONFIGS = [
    ("exact", "exact", {}),
    ("faiss Flat", "faiss", {"index": "Flat"}),
    ("faiss HNSW32 efSearch=64", "faiss", {"index": "HNSW32", "ef_search": 64}),
    ("faiss HNSW32 efSearch=128", "faiss", {"index": "HNSW32", "ef_search": 128}),
    ("faiss IVF nprobe=4", "faiss", {"index": "IVF", "nprobe": 4}),
    ("faiss IVF nprobe=32", "faiss", {"index": "IVF", "nprobe": 32}),
    ("faiss IVF nprobe tuned to 0.95", "faiss", {"index": "IVF", "target_recall": 0.95}),
    ("hnswlib M=16 ef=64", "hnswlib", {"M": 16, "ef": 64}),
    ("hnswlib M=16 ef=128", "hnswlib", {"M": 16, "ef": 128}),
]
OVERHEAD_CONFIGS = [c for c in CONFIGS if c[0].endswith(("efSearch=128", "nprobe=32", "ef=128"))]
MEMORY_CONFIGS = [c for c in CONFIGS if c[0] == "faiss Flat"] + OVERHEAD_CONFIGS


def options(opts: dict[str, Any]) -> dict[str, Any]:
    """A config's options with "IVF" replaced by this scale's IVF factory string."""
    return {**opts, "index": IVF} if opts.get("index") == "IVF" else dict(opts)


def build_column(info: dict[str, Any]) -> str:
    """'83.1' (built now) or '83.1(1.2)' (built before, loaded now), recording build times."""
    if not info or info["source"] == "direct":
        return "-"
    times = json.loads(BUILD_TIMES.read_text()) if BUILD_TIMES.exists() else {}
    if info["source"] == "built":
        times[info["path"]] = info["seconds"]
        BUILD_TIMES.write_text(json.dumps(times, indent=1))
        return f"{info['seconds']:.1f}"
    built = times.get(info["path"])
    return f"{'?' if built is None else f'{built:.1f}'}({info['seconds']:.1f})"


@pytest.mark.parametrize(("label", "name", "opts"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_search(
    benchmark: Any, case: Case, report: RatioReport, label: str, name: str, opts: dict
) -> None:
    """Build (or load) the miner, then time search(1024 queries, k=64) and measure recall."""
    miner = miners.get(name, cache_dir=INDEXES, **options(opts))
    miner.build(case.bank, case.fingerprint)
    rounds = 2 if SEED_SCALE and name == "exact" else 4
    _, ids = benchmark.pedantic(
        miner.search, args=(case.queries, K), rounds=rounds, warmup_rounds=1
    )
    seconds = benchmark.stats.stats.median
    extra = {"qps": f"{QUERIES / seconds:.0f}", "recall": f"{recall(ids, case.truth):.4f}"}
    info = getattr(miner, "build_info", {})
    extra["build_s"] = build_column(info)
    if "tuned_recall" in info:
        extra["nprobe"] = str(info["nprobe"])
    if hasattr(miner, "stats"):
        memory = miner.stats()
        extra.update(worker_peak=megabytes(memory["peak_rss"]))
        extra.update(worker_anon=megabytes(memory.get("rss_anon", 0)))
        miner.close()  # type: ignore[attr-defined]
    flops = None
    if label in ("exact", "faiss Flat"):
        flops = 2 * QUERIES * len(case.bank) * DIM
        # the machine is shared: measure the peak again beside this GEMM-bound search
        report.peak_gflops = max(report.peak_gflops or 0.0, gemm_gflops())
    report.add(
        label, benchmark, baseline=None if label == "exact" else "exact", flops=flops, **extra
    )


@pytest.mark.parametrize(
    ("label", "name", "opts"), OVERHEAD_CONFIGS, ids=[c[0] for c in OVERHEAD_CONFIGS]
)
def test_isolation_overhead(
    case: Case, report: RatioReport, label: str, name: str, opts: dict
) -> None:
    """The same cached index searched in this process and in a worker, alternately.

    exchange_ms is the worker's wall time minus the engine's own search time:
    what the pipes and the shared-memory copies cost per call.
    """
    local = miners.get(name, isolation="none", cache_dir=INDEXES, **options(opts))
    isolated = miners.get(name, isolation="process", cache_dir=INDEXES, **options(opts))
    local.build(case.bank, case.fingerprint)
    isolated.build(case.bank, case.fingerprint)
    local_times, isolated_times, exchange = [], [], []
    for round_ in range(6):
        start = time.perf_counter()
        local.search(case.queries, K)
        middle = time.perf_counter()
        isolated.search(case.queries, K)
        end = time.perf_counter()
        if round_:  # the first round warms both
            local_times.append(middle - start)
            isolated_times.append(end - middle)
            exchange.append(end - middle - isolated.worker_seconds)  # type: ignore[attr-defined]
    isolated.close()  # type: ignore[attr-defined]
    local_case = f"{label} in-process"
    report.rows[local_case] = Row(local_case, float(np.median(local_times)))
    report.rows[f"{label} isolated"] = Row(
        f"{label} isolated",
        float(np.median(isolated_times)),
        baseline=local_case,
        extra={"exchange_ms": f"{float(np.median(exchange)) * 1e3:.2f}"},
    )


TRAINER = """
import json, sys
import numpy as np
from twotower import miners
from twotower.process.memory import process_memory

bank_path, queries_path, name, cache_dir, opts, fingerprint = sys.argv[1:]
bank, queries = np.load(bank_path, mmap_mode="r"), np.load(queries_path)
miner = miners.get(name, cache_dir=cache_dir, **json.loads(opts))
miner.build(bank, fingerprint)
miner.search(queries, 64)
print(json.dumps({"trainer": process_memory(), "worker": miner.stats()}))
"""


@pytest.mark.parametrize(
    ("label", "name", "opts"), MEMORY_CONFIGS, ids=[c[0] for c in MEMORY_CONFIGS]
)
def test_memory_of_trainer_and_worker(
    case: Case, report: RatioReport, label: str, name: str, opts: dict
) -> None:
    """Peak RSS of a fresh process mining through an isolated miner (the trainer's side),
    and of its worker: the bank is mapped, so neither holds an anonymous copy of it."""
    args = [str(case.bank_path), str(case.queries_path), name, str(INDEXES)]
    args += [json.dumps(options(opts)), case.fingerprint]
    done = subprocess.run(
        [sys.executable, "-c", TRAINER, *args], capture_output=True, text=True, check=True
    )
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    trainer, worker = memory["trainer"], memory["worker"]
    report.rows.setdefault(label, Row(label, float("nan"))).extra.update(
        trainer_peak=megabytes(trainer["peak_rss"]),
        trainer_anon=megabytes(trainer.get("rss_anon", 0)),
        fresh_worker_peak=megabytes(worker["peak_rss"]),
        fresh_worker_anon=megabytes(worker.get("rss_anon", 0)),
        fresh_worker_file=megabytes(worker.get("rss_file", 0)),
    )

"""Miners in worker processes, with real faults: a real SIGSEGV, SIGABRT and SIGKILL end
the worker and come back as MinerCrashed naming the signal; a hang is killed after the
timeout; the chain faiss -> hnswlib -> exact survives a faiss that segfaults on every
search, with correct results and the events reported; and a process that searches
through isolated miners never loads faiss or hnswlib, even with torch loaded beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.neighbours import assert_same_neighbours, brute_force
from twotower import miners
from twotower.miners import MinerCrashed
from twotower.process import faults
from twotower.process.faults import ENV_VAR

pytestmark = pytest.mark.skipif(
    not {"faiss", "hnswlib"} <= set(miners.available()), reason="needs faiss and hnswlib"
)
LINUX = sys.platform.startswith("linux")


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    """Leave this process's fault switch as it was found: nothing armed, step 0."""
    yield
    faults.arm(None, "")
    faults.set_step(0)


@pytest.fixture(scope="module")
def small_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bank (400, 16), queries (8, 16), brute-force scores, ids (8, 10)), float64 reference."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((400, 16)).astype(np.float32)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    return bank, queries, *brute_force(bank, queries, 10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_isolated_flat_matches_in_process_for_memmap_slice_and_memory_banks(
    small_case, tmp_path: Path
) -> None:
    bank, queries, ref_scores, ref_ids = small_case
    np.save(tmp_path / "bank.npy", bank)
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    local = miners.get("faiss", isolation="none")
    isolated = miners.get("faiss")
    banks = [(mapped[100:], bank[100:]), (bank[::-1], bank[::-1]), (mapped, bank)]
    banks.append((bank.copy(), bank))  # a second in-memory bank replaces the first's segment
    for array, expected in banks:
        isolated.build(array)
        local.build(expected)
        scores, ids = isolated.search(queries, 10)
        local_scores, local_ids = local.search(queries, 10)
        assert (ids == local_ids).all() and (scores == local_scores).all()
    assert_same_neighbours(*isolated.search(queries, 10), ref_scores, ref_ids, atol=1e-5)
    isolated.close()


def test_segfault_in_the_worker_is_minercrashed_naming_sigsegv(small_case, monkeypatch) -> None:
    bank, queries, _, _ = small_case
    monkeypatch.setenv(ENV_VAR, "segv@mine:7:faiss")
    miner = miners.get("faiss")
    miner.build(bank)
    faults.set_step(6)
    miner.search(queries, 5)  # the fault is bound to step 7
    faults.set_step(7)
    with pytest.raises(MinerCrashed, match="SIGSEGV") as crash:
        miner.search(queries, 5)
    assert crash.value.miner == "faiss" and not alive(miner.pid)


def test_abort_in_the_worker_is_minercrashed_naming_sigabrt(small_case, monkeypatch) -> None:
    bank, queries, _, _ = small_case
    monkeypatch.setenv(ENV_VAR, "abort@mine:0:hnswlib")
    miner = miners.get("hnswlib")
    miner.build(bank)
    with pytest.raises(MinerCrashed, match="SIGABRT"):
        miner.search(queries, 5)


def test_sigkill_from_outside_is_minercrashed_naming_sigkill(small_case) -> None:
    bank, queries, _, _ = small_case
    miner = miners.get("faiss")
    miner.build(bank)
    os.kill(miner.pid, signal.SIGKILL)
    with pytest.raises(MinerCrashed, match=r"killed by SIGKILL"):
        miner.search(queries, 5)


def test_a_hung_worker_is_killed_after_the_timeout(small_case, monkeypatch, tmp_path: Path) -> None:
    bank, queries, _, _ = small_case
    monkeypatch.setenv(ENV_VAR, "hang@mine:2")
    faults.arm(tmp_path, "")  # the parent's marker directory, forwarded to the worker
    faults.set_step(2)
    miner = miners.get("faiss")
    miner.build(bank)
    miner.timeout = 1.0  # only the search is timed: a loaded machine may start a worker slowly
    with pytest.raises(MinerCrashed, match=r"no answer for 1 s") as caught:
        miner.search(queries, 5)
    assert not alive(miner.pid)
    assert (tmp_path / "hang@mine_2").exists()  # fire-once: a restarted worker will not hang
    native = caught.value.evidence["native"]  # gdb attached before the kill (Linux)
    if sys.platform.startswith("linux") and shutil.which("gdb"):
        assert native["note"] is None and native["source"].startswith("gdb attached to pid")
        symbols = " ".join(f["symbol"] or "" for f in native["threads"][0]["frames"][:8])
        assert re.search(r"futex|sem_(timed)?wait|pthread_cond", symbols), symbols


def test_an_interrupted_search_kills_its_worker(small_case, monkeypatch) -> None:
    """Ctrl-C while a worker searches: its late reply must not answer the next request."""
    bank, queries, _, _ = small_case
    monkeypatch.setenv(ENV_VAR, "hang@mine:0:faiss")
    miner = miners.get("faiss")
    miner.build(bank)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            miner.search(queries, 5)
    finally:
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(MinerCrashed, match="SIGKILL"):
        miner.search(queries, 5)


def test_a_python_error_in_the_worker_is_minercrashed_and_the_worker_lives(
    small_case, monkeypatch
) -> None:
    bank, queries, ref_scores, ref_ids = small_case
    monkeypatch.setenv(ENV_VAR, "raise@mine:3:faiss")
    miner = miners.get("faiss")
    miner.build(bank)
    faults.set_step(3)
    with pytest.raises(MinerCrashed, match="raised InjectedFault"):
        miner.search(queries, 10)
    faults.set_step(4)
    assert_same_neighbours(*miner.search(queries, 10), ref_scores, ref_ids, atol=1e-5)


def test_chain_survives_a_faiss_that_segfaults_every_time(small_case, monkeypatch) -> None:
    bank, queries, ref_scores, ref_ids = small_case
    monkeypatch.setenv(ENV_VAR, "segv@mine:4:faiss")
    events: list[dict] = []
    chain = miners.chain("faiss,hnswlib,exact", on_event=events.append, ef=400)
    chain.build(bank)
    faults.set_step(4)
    scores, ids = chain.search(queries, 10)
    assert chain.name == "hnswlib"
    assert_same_neighbours(scores, ids, ref_scores, ref_ids, atol=1e-5)  # ef covers the bank
    assert [(e["event"], e["miner"]) for e in events] == [
        ("crash", "faiss"),
        ("restart", "faiss"),
        ("crash", "faiss"),
        ("switch", "hnswlib"),
    ]
    assert all(e["step"] == 4 for e in events)
    assert "SIGSEGV" in events[0]["how"] and events[3]["previous"] == "faiss"
    chain.close()


def test_chain_falls_to_exact_when_both_ann_miners_crash(small_case, monkeypatch) -> None:
    bank, queries, ref_scores, ref_ids = small_case
    monkeypatch.setenv(ENV_VAR, "kill@mine:1:faiss,abort@mine:1:hnswlib")
    events: list[dict] = []
    chain = miners.chain(["faiss", "hnswlib", "exact"], on_event=events.append)
    chain.build(bank)
    faults.set_step(1)
    scores, ids = chain.search(queries, 10)
    assert chain.name == "exact"
    assert_same_neighbours(scores, ids, ref_scores, ref_ids, atol=1e-5)
    switches = [(e["previous"], e["miner"]) for e in events if e["event"] == "switch"]
    assert switches == [("faiss", "hnswlib"), ("hnswlib", "exact")]


def test_an_exhausted_chain_raises_the_last_crash(small_case, monkeypatch) -> None:
    bank, queries, _, _ = small_case
    monkeypatch.setenv(ENV_VAR, "segv@mine:0:faiss")
    events: list[dict] = []
    chain = miners.chain("faiss", on_event=events.append)
    chain.build(bank)
    with pytest.raises(MinerCrashed, match="SIGSEGV"):
        chain.search(queries, 5)
    assert [e["event"] for e in events] == ["crash", "restart", "crash"]


def test_threads_reach_the_worker_only(small_case) -> None:
    if not LINUX:
        pytest.skip("reads /proc/PID/environ")
    before = os.environ.get("OMP_NUM_THREADS")
    miner = miners.get("hnswlib", threads=1)
    miner.build(small_case[0])
    environ = Path(f"/proc/{miner.pid}/environ").read_bytes().split(b"\0")
    assert b"OMP_NUM_THREADS=1" in environ
    assert os.environ.get("OMP_NUM_THREADS") == before
    memory = miner.stats()
    assert memory["pid"] == miner.pid and memory["peak_rss"] > 0
    miner.close()
    assert not alive(memory["pid"])


ORPHANING_PARENT = textwrap.dedent(
    """
    import os, signal, threading, time
    import numpy as np
    from twotower import miners

    miner = miners.get("faiss")
    miner.build(np.eye(4, dtype=np.float32))
    print(miner.pid, flush=True)
    threading.Thread(target=miner.search, args=(np.eye(4, dtype=np.float32), 1)).start()
    time.sleep(0.5)  # the worker is now stuck in its search
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie awaiting its new parent counts as exited)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not LINUX, reason="reads /proc/PID/stat")
def test_a_busy_worker_exits_when_its_parent_is_killed(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "hang@mine:0:faiss")
    parent = subprocess.run(
        [sys.executable, "-c", ORPHANING_PARENT], capture_output=True, text=True, timeout=60
    )
    assert parent.returncode == -signal.SIGKILL
    worker = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)


CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import torch  # the trainer's process has torch loaded: the miners must not join it
    from twotower import miners

    bank = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    report = {}
    for name, opts in (("faiss", {"index": "HNSW8"}), ("hnswlib", {})):
        miner = miners.get(name, **opts)
        miner.build(bank)
        ids = miner.search(bank[:4], 3)[1]
        worker_maps = Path(f"/proc/{miner.pid}/maps").read_text()
        report[name] = {
            "found_self": ids[:, 0].tolist() == [0, 1, 2, 3],
            "worker_has_library": name in worker_maps,
            "worker_has_torch": "libtorch" in worker_maps,
        }
    own_maps = Path("/proc/self/maps").read_text()
    libraries = ("faiss", "hnswlib")
    report["parent_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in libraries)
    report["parent_libraries"] = sorted(
        {line.split()[-1] for line in own_maps.splitlines() if "faiss" in line or "hnswlib" in line}
    )
    report["parent_has_torch"] = "libtorch" in own_maps
    print(json.dumps(report))
    """
)


@pytest.mark.slow  # imports torch in a fresh interpreter (seconds)
@pytest.mark.skipif(not LINUX, reason="reads /proc/PID/maps")
def test_the_searching_process_never_loads_faiss_or_hnswlib() -> None:
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["parent_modules"] == [] and report["parent_libraries"] == []
    assert report["parent_has_torch"]  # positive control: the scan sees what is loaded
    for name in ("faiss", "hnswlib"):
        assert report[name] == {
            "found_self": True,
            "worker_has_library": True,
            "worker_has_torch": False,
        }

"""A miner in its own process, and how that process's end is reported.

Why: faiss and torch each bring their own OpenMP runtime, and in one process
they can die together with no traceback ("Segmentation fault: 11"; faiss
issue 4273, pytorch issue 149201). So `IsolatedMiner` runs the engine in a
worker started as `python -m twotower.miners.worker` through subprocess: a
fresh interpreter, neither a fork of the trainer nor multiprocessing's spawn
(which re-imports the parent's __main__, and with it torch). The worker
imports numpy, its library and twotower's light modules, never torch.

The exchange: small pickled dicts over two pipes; queries and results through
one shared-memory buffer that grows to the largest request; the bank through
its memory map (file and offset), or, when it is in memory, through a
shared-memory copy made once per IsolatedMiner (a switch to another isolated
miner makes its own copy).

A worker that dies raises `MinerCrashed` naming the signal (SIGSEGV, SIGKILL,
SIGABRT, ...) or the exit code; one that does not answer a search within
`timeout` seconds is killed with SIGKILL and raises MinerCrashed("... no answer
for N s ..."). POSIX only (the pipes are passed by file descriptor).
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from twotower import progress
from twotower.config import MINER_TIMEOUT
from twotower.errors import UsageError
from twotower.miners.base import BUILD_FAULT_PHASE, MinerCrashed
from twotower.miners.worker_death import WorkerRecord
from twotower.process import faults, wait_policy
from twotower.process.exit_status import ExitStatus
from twotower.process.memory import portable_reading
from twotower.process.openmp import THREAD_VARIABLES
from twotower.process.phase import Phase

EXIT_WAIT = 10.0  # seconds to let a worker that closed its pipe finish dying
MIN_BUFFER_BYTES = 1 << 20
STACK_DUMP_WAIT = 0.5  # seconds a silent worker gets to write its stacks before SIGKILL
WAIT_SLICE = 0.5  # seconds between looks at a busy worker's CPU time while waiting on it


def result_views(
    segment: SharedMemory, n: int, dim: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The request buffer's layout.

    Returns (ids (n, k) int64, scores (n, k) float32, queries (n, dim) float32) views of it.
    """
    buffer = segment.buf
    assert buffer is not None
    ids = np.ndarray((n, k), np.int64, buffer, 0)
    scores = np.ndarray((n, k), np.float32, buffer, ids.nbytes)
    queries = np.ndarray((n, dim), np.float32, buffer, ids.nbytes + scores.nbytes)
    return ids, scores, queries


def buffer_bytes(n: int, dim: int, k: int) -> int:
    """Bytes `result_views` needs for n queries of dim floats and k neighbours each."""
    return n * k * (8 + 4) + n * dim * 4


def file_location(bank: np.ndarray) -> dict[str, Any] | None:
    """Where a C-contiguous float32 view of a memory-mapped file lies in that file.

    Returns {"kind": "file", "file", "offset", "shape", "dtype"}, or None when
    the bank is not such a view (an in-memory array, a copy-on-write map).
    A slice of an np.memmap keeps its parent's `offset`, so the offset is
    worked out from addresses instead.
    """
    owner: Any = bank
    while owner is not None and getattr(owner, "_mmap", None) is None:
        owner = owner.base if isinstance(owner, np.ndarray) else None
    if owner is None or getattr(owner, "mode", "c") == "c" or not bank.flags.c_contiguous:
        return None
    if bank.dtype != np.float32:
        return None
    mapping = owner._mmap  # np.memmap's own mmap: the file from offset - offset % granularity
    map_start = np.frombuffer(mapping, np.uint8).ctypes.data
    map_file_offset = owner.offset - owner.offset % mmap.ALLOCATIONGRANULARITY
    return {
        "kind": "file",
        "file": str(owner.filename),
        "offset": map_file_offset + bank.ctypes.data - map_start,
        "shape": bank.shape,
        "dtype": bank.dtype.str,
    }


class _Worker:
    """One worker process, its two pipes, and the evidence a crash report needs of it."""

    def __init__(self, miner: str, threads: int | None):
        self.miner = miner
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        env = wait_policy.child_env(os.environ)  # its faiss loads OpenMP: sleep, not spin, idle
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        if threads is not None:
            env.update({var: str(threads) for var in THREAD_VARIABLES})
        command = [sys.executable, "-m", "twotower.miners.worker"]
        self.record = WorkerRecord(miner, command)
        env.update(self.record.env())
        try:
            self.process = subprocess.Popen(
                [*command, str(request_read), str(reply_write)],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            self.record.discard()
            raise
        self.record.started_as(self.process.pid)
        os.close(request_read)  # the worker's ends: with them closed here, its death reads as EOF
        os.close(reply_write)
        self.requests = Connection(request_write, readable=False)
        self.replies = Connection(reply_read, writable=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send one request, return its reply; MinerCrashed if the worker dies or stays silent.

        The MinerCrashed of a dead worker carries its evidence (`worker_death.WorkerRecord`).
        While it waits, the worker's progress events are relayed to this process's
        progress sink and its CPU time is reported as liveness (`progress.alive`).
        """
        try:
            self.requests.send(message)
            reply = self._wait(message, timeout)
        except (EOFError, OSError):
            how = self._how_it_ended()
            raise MinerCrashed(
                self.miner, how, self.record.evidence(self.process, message)
            ) from None
        except BaseException:  # interrupted mid-request: a late reply would answer the next one
            self.kill()
            raise
        finally:
            progress.end_relayed()
        if "error" in reply:
            if reply["usage"]:
                raise UsageError(reply["message"])
            raise MinerCrashed(self.miner, f"raised {reply['error']}: {reply['message']}")
        self.record.note_reply(reply)
        return reply

    def _dump_stacks(self) -> None:
        """Ask a silent worker for every thread's stack before the kill: its Python stacks
        (faulthandler's SIGUSR1), then its native ones (gdb attached, Linux)."""
        if hasattr(signal, "SIGUSR1") and self.process.poll() is None:
            os.kill(self.pid, signal.SIGUSR1)
            time.sleep(STACK_DUMP_WAIT)
        if sys.platform.startswith("linux") and self.process.poll() is None:
            self.record.read_hung_stacks(self.pid)

    def _wait(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """The reply to `message`, relaying progress events that come before it; after
        `timeout` s without it, the stacks are asked for and the worker is killed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
            if left <= 0:
                self._dump_stacks()
                self.kill()
                watchdog = {"silent_s": timeout, "timeout": timeout}
                raise MinerCrashed(
                    self.miner,
                    f"no answer for {timeout:g} s; worker pid {self.pid} killed",
                    self.record.evidence(self.process, message, watchdog),
                )
            if self.replies.poll(left):
                reply: dict[str, Any] = self.replies.recv()
                if "progress" not in reply:
                    return reply
                progress.relay(reply["progress"], reply["task"])
                continue
            reading = portable_reading(self.pid)
            if reading is not None:
                progress.alive(f"miner worker pid {self.pid}", float(reading["cpu_s"]))

    def _how_it_ended(self) -> str:
        returncode = self.record.reap(self.process, EXIT_WAIT)
        if returncode is None:
            self.kill()
            return f"worker pid {self.pid} closed its pipe and was killed"
        return f"worker pid {self.pid} {ExitStatus(returncode).describe(meaning=False)}"

    def kill(self) -> None:
        """SIGKILL the worker (if it still runs) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.record.reap(self.process, None)

    def close(self) -> None:
        """Ask the worker to exit, kill it if it does not within EXIT_WAIT s, close the pipes."""
        if self.process.poll() is None:
            try:
                self.requests.send({"op": "close"})
                self.process.wait(EXIT_WAIT)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.requests.close()
        self.replies.close()
        self.record.discard()


class _Resources:
    """What an IsolatedMiner must give back: its worker and its shared-memory segments."""

    def __init__(self) -> None:
        self.worker: _Worker | None = None
        self.segments: dict[str, SharedMemory] = {}  # "bank", "buffer"

    def replace(self, role: str, segment: SharedMemory) -> None:
        """Hold `segment` as the "bank" or "buffer", unlinking the one it replaces.

        The worker keeps its mapping of the old one until a request names the new one.
        """
        old = self.segments.pop(role, None)
        if old is not None:
            old.close()
            old.unlink()
        self.segments[role] = segment

    def release(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        for segment in self.segments.values():
            segment.close()
            segment.unlink()
        self.segments.clear()


class IsolatedMiner:
    """A miner engine ("faiss", "hnswlib", "exact") running in a worker process.

    engine_opts: keyword options for the engine, made in the worker.
    threads: the worker's threads: OMP/BLAS thread counts in its environment,
    then threadpoolctl's limits once its engine is loaded (engines that take
    `threads` get it in engine_opts too).
    timeout: seconds a search (and the worker's start) may take before the
    worker is killed; build_timeout: the same for build (None: no limit).
    fault_phase: the fault point each search reaches in the worker ("mine"; None: none).
    """

    def __init__(
        self,
        name: str,
        engine_opts: dict[str, Any] | None = None,
        threads: int | None = None,
        timeout: float = MINER_TIMEOUT,
        build_timeout: float | None = None,
        fault_phase: str | None = "mine",
    ):
        self.name = name
        self.fault_phase = fault_phase
        self.engine_opts = dict(engine_opts or {})
        self.threads = threads
        self.timeout = timeout
        self.build_timeout = build_timeout
        self.build_info: dict[str, Any] = {}
        self.worker_seconds = 0.0  # the engine's own time in the last search (without the exchange)
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._start()

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._worker.pid

    @property
    def _worker(self) -> _Worker:
        if self._resources.worker is None:
            raise RuntimeError(f"isolated miner {self.name} is closed")
        return self._resources.worker

    def build(self, bank: np.ndarray, fingerprint: str | None = None) -> None:
        """Index bank (M, D) float32 in the worker, which reads it through its memory map.

        An in-memory bank is copied into shared memory once. `fingerprint` keys the index cache.
        """
        location = file_location(bank)
        if location is None:
            location = self._share(np.ascontiguousarray(bank, dtype=np.float32))
        request = {"op": "build", "bank": location, "fingerprint": fingerprint}
        request.update(self._fault_fields(BUILD_FAULT_PHASE if self.fault_phase else None))
        self.build_info = self._worker.ask(request, self.build_timeout)["build_info"]

    def check(self, rows: int, dim: int) -> list[str]:
        """Refuse options a bank of rows x dim cannot be indexed with (UsageError, from the
        engine in the worker, before anything is built); returns warnings worth logging."""
        warnings: list[str] = self._worker.ask(
            {"op": "check", "rows": rows, "dim": dim}, self.timeout
        )["warnings"]
        return warnings

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, D) -> (scores (N, k) float32 dot products, ids (N, k) int64), best first.

        Raises MinerCrashed if the worker dies or gives no answer within `timeout` seconds.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, dim = queries.shape
        segment = self._buffer(buffer_bytes(n, dim, k))
        ids, scores, query_view = result_views(segment, n, dim, k)
        query_view[...] = queries
        request = {"op": "search", "buffer": segment.name, "n": n, "dim": dim, "k": k}
        request.update(self._fault_fields(self.fault_phase))
        what = f"{self.name} top-{k} of {n:,} queries in worker pid {self.pid}"
        with progress.task(Phase.SEARCH, what, phase=False):  # a detail of the caller's phase
            self.worker_seconds = self._worker.ask(request, self.timeout)["seconds"]
        return scores.copy(), ids.copy()

    @staticmethod
    def _fault_fields(phase: str | None) -> dict[str, Any]:
        """What the worker's fault switch needs: this process's step and markers, the phase."""
        marker_dir = faults.marker_dir()
        return {
            "step": faults.current_step(),
            "marker_dir": marker_dir and str(marker_dir),
            "phase": phase,
        }

    def raise_recall(self) -> dict[str, int]:
        """The engine's `base.raise_recall`, in the worker."""
        params: dict[str, int] = self._worker.ask({"op": "raise_recall"}, self.timeout)["params"]
        return params

    def use_params(self, params: dict[str, int]) -> None:
        """The engine's `base.use_params`, in the worker."""
        self._worker.ask({"op": "use_params", "params": params}, self.timeout)

    def stats(self) -> dict[str, int]:
        """The worker's memory in bytes and CPU seconds (`memory.process_memory`): pid, rss,
        peak_rss, cpu_s and, on Linux, rss_anon, rss_file, rss_shmem."""
        memory: dict[str, int] = self._worker.ask({"op": "stats"}, self.timeout)["memory"]
        return memory

    def threadpools(self) -> list[dict[str, Any]]:
        """The worker's thread pools as threadpoolctl sees them inside it (`openmp.threadpools`)."""
        pools: list[dict[str, Any]] = self._worker.ask({"op": "threadpools"}, self.timeout)[
            "threadpools"
        ]
        return pools

    def close(self) -> None:
        """Stop the worker and free the shared memory (also done when the miner is collected)."""
        self._finalizer()

    def _start(self) -> None:
        self._resources.worker = _Worker(self.name, self.threads)
        start = {
            "op": "start",
            "name": self.name,
            "opts": self.engine_opts,
            "threads": self.threads,
        }
        self._worker.ask(start, self.timeout)

    def _share(self, bank: np.ndarray) -> dict[str, Any]:
        """Copy an in-memory bank into a new shared-memory segment (once per miner)."""
        segment = SharedMemory(create=True, size=max(bank.nbytes, 1))
        self._resources.replace("bank", segment)
        np.ndarray(bank.shape, bank.dtype, segment.buf)[...] = bank
        return {"kind": "shm", "name": segment.name, "shape": bank.shape, "dtype": bank.dtype.str}

    def _buffer(self, nbytes: int) -> SharedMemory:
        """The request buffer, replaced by one twice as large when a request outgrows it."""
        current = self._resources.segments.get("buffer")
        if current is not None and current.size >= nbytes:
            return current
        size = max(nbytes, MIN_BUFFER_BYTES, 2 * (current.size if current else 0))
        segment = SharedMemory(create=True, size=size)
        self._resources.replace("buffer", segment)
        return segment

"""The miner worker process: `python -m twotower.miners.worker REQUEST_FD REPLY_FD`.

Started by `isolation.IsolatedMiner`, never by hand. It imports numpy, the
engine's library and twotower's light modules, never torch; it reads the bank
through its memory map (or the parent's shared-memory copy) and answers one
request at a time:

    {"op": "start", "name", "opts", "threads"} make the engine, then limit this process's
                                               thread pools to `threads` (None: no limit)
    {"op": "check", "rows", "dim"}             -> {"warnings"} (or a UsageError reply)
    {"op": "build", "bank", "fingerprint", "step", "marker_dir", "phase"}
                                               -> {"build_info"}
    {"op": "search", "buffer", "n", "dim", "k", "step", "marker_dir", "phase"}
                                               -> {"seconds"}, results in the buffer
    {"op": "raise_recall"}                     -> {"params"}: the engine searches wider
    {"op": "use_params", "params"}             -> {}: recorded search parameters set again
    {"op": "stats"}                            -> {"memory"}
    {"op": "threadpools"}                      -> {"threadpools"}: threadpoolctl's view here
    {"op": "close"}                            exit 0 (so does the parent closing its pipe)

A thread watches the parent: if it dies while a long build runs, the worker exits too.

While a request runs, the engine's progress (`twotower.progress` tasks: the
index build's training, adding and saving) goes to the parent as
{"progress": "start" | "advance" | "end", "task"} messages before the reply.

A Python exception becomes an {"error", "message", "usage"} reply; a native
crash ends the process, which the parent reports by its signal. Each build
reaches the fault point "build-index" and each search "mine" here, with the
parent's step and marker directory.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from twotower import miners, progress
from twotower.errors import UsageError
from twotower.miners.base import Miner, raise_recall, use_params
from twotower.miners.isolation import result_views
from twotower.process import faults
from twotower.process.crash_dump import enable_crash_dumps
from twotower.process.memory import process_memory
from twotower.process.openmp import openmp_runtimes, threadpools
from twotower.process.threads import limit_threads

ORPHAN_CHECK_SECONDS = 1.0
PROGRESS_EVERY = 0.25  # seconds between the advance messages of one task
# tests: a build lasts at least this many seconds, busy on the CPU after the real build and
# with no progress messages, as a slower machine's single native call would
MIN_BUILD_ENV = "TWOTOWER_TEST_MIN_BUILD_SECONDS"


def attach(name: str) -> SharedMemory:
    """Open the parent's segment `name` without this process's resource tracker claiming it.

    Python < 3.13 registers attached segments too (bpo-39959) and would unlink
    the parent's segment when this worker exits.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    segment = SharedMemory(name=name)
    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


class Server:
    """The worker's state: its engine, its view of the bank, the request buffer it has open."""

    def __init__(self) -> None:
        self.engine: Miner | None = None
        self.segments: dict[str, SharedMemory] = {}  # "bank", "buffer"
        self.marker_dir: str | None = None

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request -> its reply; an exception becomes an error reply."""
        try:
            return getattr(self, "op_" + message["op"])(message)
        except Exception as error:  # the parent decides what a failure means
            return {
                "error": type(error).__name__,
                "message": str(error),
                "usage": isinstance(error, UsageError),
            }

    def op_start(self, message: dict[str, Any]) -> dict[str, Any]:
        faults.arm(None)
        self.engine = miners.engine(message["name"], **message["opts"])
        if message.get("threads") is not None:
            limit_threads(message["threads"])  # after the engine has loaded its library
        return {"pid": os.getpid(), "openmp": openmp_runtimes()}

    def op_check(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.engine is not None
        check = getattr(self.engine, "check", None)
        return {"warnings": check(message["rows"], message["dim"]) if check else []}

    def op_build(self, message: dict[str, Any]) -> dict[str, Any]:
        bank = message["bank"]
        shape, dtype = tuple(bank["shape"]), np.dtype(bank["dtype"])
        segment = None
        if bank["kind"] == "file":
            array = np.memmap(bank["file"], dtype, "r", bank["offset"], shape)
        else:
            segment = self._attached("bank", bank["name"])
            array = np.ndarray(shape, dtype, segment.buf)
        assert self.engine is not None
        self._fault_point(message)
        started = time.monotonic()
        self.engine.build(array, message["fingerprint"])
        busy_until(started + float(os.environ.get(MIN_BUILD_ENV) or 0))
        self._hold("bank", segment)  # only now has the engine let go of the old bank
        return {"build_info": getattr(self.engine, "build_info", {}), "openmp": openmp_runtimes()}

    def _fault_point(self, message: dict[str, Any]) -> None:
        """The request's fault point, armed with the parent's step and marker directory."""
        if message["marker_dir"] != self.marker_dir:
            self.marker_dir = message["marker_dir"]
            faults.arm(None if self.marker_dir is None else Path(self.marker_dir))
        faults.set_step(message["step"])
        if message["phase"] is not None:
            assert self.engine is not None
            faults.point(message["phase"], [self.engine.name])

    def op_search(self, message: dict[str, Any]) -> dict[str, Any]:
        n, dim, k = message["n"], message["dim"], message["k"]
        buffer = self._attached("buffer", message["buffer"])
        self._hold("buffer", buffer)
        ids, scores, queries = result_views(buffer, n, dim, k)
        self._fault_point(message)
        assert self.engine is not None
        start = time.perf_counter()
        scores[...], ids[...] = self.engine.search(queries, k)
        return {"seconds": time.perf_counter() - start}

    def op_raise_recall(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"params": raise_recall(self.engine)}

    def op_use_params(self, message: dict[str, Any]) -> dict[str, Any]:
        use_params(self.engine, message["params"])
        return {}

    def op_stats(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"memory": process_memory()}

    def op_threadpools(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"threadpools": threadpools()}

    def _attached(self, role: str, name: str) -> SharedMemory:
        """Segment `name`: the one held for `role` if it is that, else newly attached."""
        current = self.segments.get(role)
        return current if current is not None and current.name == name else attach(name)

    def _hold(self, role: str, segment: SharedMemory | None) -> None:
        """Keep `segment` for `role` (None: nothing) and unmap the one it replaces.

        numpy views do not pin a segment, so one is unmapped only when nothing reads it.
        """
        old = self.segments.pop(role, None)
        if old is not None and old is not segment:
            old.close()
        if segment is not None:
            self.segments[role] = segment


def busy_until(deadline: float) -> None:
    """Use the CPU until time.monotonic() reaches `deadline` (see MIN_BUILD_ENV)."""
    while time.monotonic() < deadline:
        sum(range(10_000))


class PipeSink:
    """The worker's progress sink: each task event goes to the parent as a message."""

    def __init__(self, replies: Connection):
        self.replies = replies
        self._sent = 0.0

    def start(self, task: progress.Task) -> None:
        self._send("start", task)

    def advance(self, task: progress.Task) -> None:
        if time.monotonic() - self._sent >= PROGRESS_EVERY:
            self._send("advance", task)

    def end(self, task: progress.Task) -> None:
        self._send("end", task)

    def alive(self, source: str, cpu_seconds: float) -> None:
        """Nothing: the parent watches this process's CPU time itself."""

    def _send(self, event: str, task: progress.Task) -> None:
        self._sent = time.monotonic()
        self.replies.send({"progress": event, "task": task.as_dict()})


def exit_when_orphaned(parent: int, every: float = ORPHAN_CHECK_SECONDS) -> None:
    """Exit this process once `parent` is gone (killed mid-build, say): run it in a thread.

    The request pipe's EOF tells the same, but only between requests.
    """
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Serve requests from fd argv[0], replying on fd argv[1], until told to close. Returns 0."""
    request_fd, reply_fd = (int(arg) for arg in (argv or sys.argv[1:]))
    os.dup2(2, 1)  # library chatter goes to stderr, never into the trainer's stdout
    if enable_crash_dumps() is None:  # the parent names a stack file; by hand: stderr
        faulthandler.enable()
    threading.Thread(target=exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    requests = Connection(request_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    server = Server()
    progress.install(PipeSink(replies))
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return 0
        if message["op"] == "close":
            return 0
        replies.send(server.handle(message))


if __name__ == "__main__":
    sys.exit(main())

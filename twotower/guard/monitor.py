"""One child process under watch, for the supervisor and `twotower watch`.

`WatchedChild.run()` starts a command (no shell) in its own session, so a
terminal's Ctrl-C reaches only this process, which forwards it once
(`SignalForwarder`); copies the child's stderr through to ours while keeping
its tail; samples its memory and OpenMP runtimes; reads its heartbeat (a
twotower trainer's) and, if it stops changing for `hang_timeout` seconds, asks
the child for every thread's stack (SIGUSR1) and kills its process group; and
reaps it with `os.wait4`, whose rusage gives the child's own peak RSS even
when it was killed. Native frames (`guard.native`): the child may leave a core, read after a
crash, and the watchdog attaches gdb before its SIGKILL. The result is a
`forensics.ChildOutcome`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from twotower.errors import UsageError
from twotower.guard import evidence, forensics
from twotower.guard.native import NativeWatch
from twotower.process.cores import dumping_core
from twotower.process.exit_status import ExitStatus
from twotower.process.memory import rss_kb
from twotower.process.openmp import mapped_openmp_runtimes
from twotower.run.records import Beat

POLL_SECONDS = 0.1  # how often the child is checked (its exit, heartbeat, watchdog)
RSS_EVERY = 2.0  # seconds between direct RSS samples (a heartbeat brings its own)
MAPS_EVERY = 5.0  # seconds between samples of the child's mapped OpenMP runtimes (psutil smaps)
STACK_WAIT = 5.0  # seconds the watchdog waits for the stack dump before SIGKILL
STDERR_WAIT = 2.0  # seconds to wait for the end of a dead child's stderr
TAIL_BYTES = 64 * 1024


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a watched child: unbuffered output, faulthandler on, plus `extra`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **extra}


def say(message: str) -> None:
    """One line to stderr, prefixed like the trainer's log lines, flushed at once."""
    print(f"twotower: {message}", file=sys.stderr, flush=True)


class SignalForwarder:
    """While entered: SIGINT and SIGTERM to this process are forwarded to `child_pid` (if
    set) and remembered in `received`. Outside the main thread it installs nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.child_pid: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._forward)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self.child_pid is not None and not dumping_core(self.child_pid):  # let it finish
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(self.child_pid, signum)


class _Tee(threading.Thread):
    """Copies a pipe to our stderr (and a file), keeping its last TAIL_BYTES."""

    def __init__(self, source: IO[bytes], copy: Path | None):
        super().__init__(daemon=True, name="twotower-stderr")
        self.source = source
        self.copy = copy
        self.tail = b""

    def run(self) -> None:
        copy = self.copy.open("ab") if self.copy else None
        try:
            while chunk := os.read(self.source.fileno(), 65536):
                self.tail = (self.tail + chunk)[-TAIL_BYTES:]
                _to_stderr(chunk)
                if copy is None:
                    continue
                try:
                    copy.write(chunk)
                    copy.flush()
                except OSError:  # e.g. a full disk: stop copying, keep draining the pipe
                    copy.close()
                    copy = None
        finally:
            if copy is not None:
                copy.close()
            self.source.close()

    def text(self, wait: float) -> str:
        """The tail so far, after waiting up to `wait` s for the pipe's end."""
        self.join(wait)
        return self.tail.decode(errors="replace")


def _to_stderr(chunk: bytes) -> None:
    try:
        buffer = getattr(sys.stderr, "buffer", None)
        if buffer is None:
            sys.stderr.write(chunk.decode(errors="replace"))
        else:
            sys.stderr.flush()
            buffer.write(chunk)
            buffer.flush()
    except (OSError, ValueError):  # our stderr is gone: keep the child running
        pass


def _executable(pid: int) -> str:
    """The program `pid` runs ('' where /proc cannot say: macOS)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    """SIGKILL the child's process group (it leads its own session: its workers die too)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class WatchedChild:
    """Run `command` with `env` under watch; `run()` returns its `forensics.ChildOutcome`.

    heartbeat: a twotower heartbeat file to follow (beats of other pids are
    ignored). hang_timeout: seconds without a heartbeat change before the
    watchdog acts (needs heartbeat). stack_file: where the child's faulthandler
    writes (read after exit; removed if empty). stderr_copy: a file that gets
    the child's whole stderr. signals: the forwarder the caller has entered.
    tree: sample memory and OpenMP runtimes of the child and every process it
    starts (a shell script wrapping python), not of the child alone. keep_core: keep the
    core a crash leaves after reading it (None: $TWOTOWER_KEEP_CORE decides).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        signals: SignalForwarder,
        heartbeat: Path | None = None,
        hang_timeout: float | None = None,
        stack_file: Path | None = None,
        stderr_copy: Path | None = None,
        note: Callable[[str], None] = say,
        tree: bool = False,
        keep_core: bool | None = None,
    ):
        self.command = list(command)
        self.env = env
        self.signals = signals
        self.heartbeat = heartbeat
        self.hang_timeout = hang_timeout
        self.stack_file = stack_file
        self.stderr_copy = stderr_copy
        self.note = note
        self.tree = tree
        self.keep_core = keep_core
        self.native: NativeWatch | None = None
        self.hang_stacks: dict[str, Any] | None = None
        self.memory = evidence.MemoryTrend()
        self.beat: Beat | None = None
        self.openmp: set[str] | None = None  # None until a census could be taken
        self.watchdog: dict[str, Any] | None = None
        self._beat_bytes = b""
        self._last_change = self._next_rss = self._next_maps = 0.0
        self._kill_at: float | None = None  # the watchdog's SIGKILL deadline, once it acted
        self._dump_sizes = (0, -1)  # the stack file's size before SIGUSR1, and at the last poll

    def run(self) -> forensics.ChildOutcome:
        """Start the child, watch it until it exits, and describe how it ended."""
        oom_before = evidence.oom_kill_count()
        started, t0 = time.time(), time.monotonic()
        self.native = native = NativeWatch(Path.cwd(), self.keep_core)
        try:
            process = subprocess.Popen(
                self.command,
                env=self.env,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            raise UsageError(f"cannot run {self.command[0]}: {error.strerror}") from None
        native.allow(process.pid)
        assert process.stderr is not None
        tee = _Tee(process.stderr, self.stderr_copy)
        tee.start()
        self._last_change = t0
        self._next_rss = self._next_maps = t0 + 0.5  # past the interpreter's start
        self.signals.child_pid = process.pid
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                now = time.monotonic()
                self._sample(process.pid, now - t0, now)
                self._watchdog(process.pid, now)
                time.sleep(POLL_SECONDS)
        except BaseException:
            _kill_group(process.pid)
            process.wait()
            raise
        finally:
            self.signals.child_pid = None
        process.returncode = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        self._read_heartbeat(process.pid, time.monotonic() - t0, time.monotonic())
        stderr = tee.text(STDERR_WAIT)
        oom_after = evidence.oom_kill_count()
        interrupted = self.signals.received
        exit_status = ExitStatus(process.returncode)
        crash = native.after_crash_safely(
            process.pid, exit_status.signal, os.WCOREDUMP(status), self.command
        )
        for core in native.plan.sweep(started) if self.tree else []:  # a trainer's own cores
            # are its miner workers', read and deleted by their reports; a rank's sibling may
            # write the same `core` meanwhile: sweep only a user's command tree
            self.note(f"deleted the core {core} a process it started left (--keep-core keeps it)")
        return forensics.ChildOutcome(
            command=self.command,
            pid=process.pid,
            exit=exit_status,
            started=started,
            seconds=time.monotonic() - t0,
            peak_rss_kb=peak or None,
            memory=self.memory,
            heartbeat=self.beat,
            openmp=sorted(self.openmp) if self.openmp is not None else None,
            stacks=self._stacks() or evidence.fatal_error_dump(stderr),
            stderr_tail=stderr,
            watchdog=self.watchdog,
            interrupted=signal.Signals(interrupted).name if interrupted else None,
            oom_kills=(
                oom_after - oom_before if oom_after is not None and oom_before is not None else None
            ),
            native=crash or self.hang_stacks,
        )

    # --- while it runs --------------------------------------------------------------------

    def _sample(self, pid: int, seconds: float, now: float) -> None:
        self._read_heartbeat(pid, seconds, now)
        if self.native is not None and self.native.executable is None:  # once: for gdb
            self.native.executable = _executable(pid)
        step = self.beat.step if self.beat else None
        if now >= self._next_rss:
            self._next_rss = now + RSS_EVERY
            rss = rss_kb(pid, tree=self.tree)
            if rss:
                self.memory.add(seconds, rss, step)
        recorded = self.beat is not None and self.beat.extra.get("openmp") is not None
        if now >= self._next_maps and not recorded:  # a trainer's own record is exact and free
            self._next_maps = now + MAPS_EVERY
            self._add_openmp(mapped_openmp_runtimes(pid, tree=self.tree))

    def _read_heartbeat(self, pid: int, seconds: float, now: float) -> None:
        if self.heartbeat is None:
            return
        try:
            raw = self.heartbeat.read_bytes()
        except OSError:
            return
        if raw == self._beat_bytes:
            return
        self._beat_bytes = raw
        try:
            beat = Beat.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # replaced while read, or not a heartbeat
        if beat.pid != pid:
            return  # an earlier child's
        self.beat = beat
        self._last_change = now
        self._add_openmp(beat.extra.get("openmp"))
        if beat.rss_kb:
            self.memory.add(seconds, beat.rss_kb, beat.step)

    def _add_openmp(self, runtimes: list[str] | None) -> None:
        if runtimes is not None:
            self.openmp = (self.openmp or set()) | set(runtimes)

    def _watchdog(self, pid: int, now: float) -> None:
        """Past the hang timeout: ask for the stacks (SIGUSR1); once the dump has stopped
        growing, or STACK_WAIT s later, SIGKILL the child's process group."""
        if self._kill_at is not None:
            size = self._stack_size()
            dumped = size > self._dump_sizes[0] and size == self._dump_sizes[1]
            self._dump_sizes = (self._dump_sizes[0], size)
            if dumped or now >= self._kill_at:
                if self.native is not None:
                    self.hang_stacks = self.native.before_kill(pid)
                _kill_group(pid)
                self._kill_at = float("inf")  # killed: wait for the exit
            return
        if self.heartbeat is None or self.hang_timeout is None:
            return
        if now - self._last_change <= self.hang_timeout:
            return
        silent = now - self._last_change
        beat = self.beat
        self.watchdog = {
            "timeout": self.hang_timeout,
            "silent_s": round(silent, 1),
            "phase": beat.phase if beat else None,
            "step": beat.step if beat else None,
        }
        where = f"phase {beat.phase}, step {beat.step}" if beat else "start-up: no heartbeat yet"
        self.note(
            f"watchdog: no heartbeat from pid {pid} for {silent:.0f} s ({where}): "
            "dumping its stacks, then SIGKILL"
        )
        self._dump_sizes = (self._stack_size(), -1)
        self._kill_at = now + STACK_WAIT
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)

    def _stack_size(self) -> int:
        try:
            return self.stack_file.stat().st_size if self.stack_file else 0
        except OSError:
            return 0

    def _stacks(self) -> str | None:
        """The child's faulthandler output, if it wrote any; an empty file is removed."""
        if self.stack_file is None or not self.stack_file.exists():
            return None
        text = self.stack_file.read_text(errors="replace").strip()
        if not text:
            self.stack_file.unlink(missing_ok=True)
        return text or None

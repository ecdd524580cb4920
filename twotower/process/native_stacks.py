"""Native stacks of a process with gdb: from a core after a crash, or attached to a live one.

`from_core(core, executable)` and `from_pid(pid)` run `gdb -batch` with a short Python script
(gdb's own API) that prints every thread's frames as JSON: the library (shared object) of each
frame, its symbol as gdb demangles it, the offset from that symbol and the pc; the thread that
crashed (a core's current thread) comes first and is marked. The result is a `NativeStacks`
whose `as_dict()` is a crash report's "native" section. Where gdb is missing, times out or
may not attach (ptrace refused), the result carries `note`: one line saying which and why.

Nothing here runs before a crash or a hang: the cost is paid after the fact (a few seconds for
a process with torch loaded: gdb reads libtorch_cpu's symbol table).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE", "SIGTRAP", "SIGSYS")
GDB_TIMEOUT = 60.0  # seconds for gdb to read a core or attach and walk every thread
CRASHED_FRAMES = 64  # frames kept of the crashing (or hung main) thread
OTHER_FRAMES = 24  # frames kept of every other thread
MARK = "TWOTOWER-NATIVE-STACKS "

# Runs inside gdb (its Python): one JSON line after MARK.
GDB_SCRIPT = """
import gdb, json, re

def frames(limit):
    found, frame = [], gdb.newest_frame()
    while frame is not None and len(found) < limit:
        pc = frame.pc()
        library = gdb.solib_name(pc) or gdb.current_progspace().filename
        symbol, offset = frame.name(), None
        where = gdb.execute("info symbol %d" % pc, to_string=True).strip()
        hit = re.match(r"(.*?)(?: \\+ (\\d+))? in section ", where)
        if hit:
            symbol, offset = symbol or hit.group(1), int(hit.group(2) or 0)
        entry = {"library": library, "symbol": symbol, "offset": offset, "pc": pc}
        if frame.type() == gdb.SIGTRAMP_FRAME:
            entry["signal_frame"] = True
        found.append(entry)
        try:
            frame = frame.older()
        except gdb.error:
            break
    return found

inferior = gdb.selected_inferior()
current = gdb.selected_thread()
threads = sorted(inferior.threads(), key=lambda t: (t != current, t.num))
out = {"pid": inferior.pid, "threads": [], "images": [], "signal": None}
try:
    out["signal"] = int(gdb.parse_and_eval("$_siginfo.si_signo"))
except gdb.error:
    pass
for thread in threads:
    thread.switch()
    name = "LWP %d" % thread.ptid[1] + (" (%s)" % thread.name if thread.name else "")
    try:
        stack = frames(LIMITS[0] if thread == current else LIMITS[1])
    except gdb.error as error:
        stack, name = [], name + " (unreadable: %s)" % error
    out["threads"].append({"name": name, "current": thread == current, "frames": stack})
for line in gdb.execute("info sharedlibrary", to_string=True).splitlines():
    hit = re.match(r"0x[0-9a-f]+\\s+0x[0-9a-f]+\\s+\\S+\\s+(?:\\(\\*\\)\\s+)?(/.*)$", line.strip())
    if hit:
        out["images"].append(hit.group(1))
print(MARK + json.dumps(out))
"""


@dataclass
class NativeStacks:
    """Every thread's native frames as gdb saw them, or `note` saying why there are none.

    threads: [{"name", "crashed", "frames": [{"library", "symbol", "offset", "pc"}]}], the
    crashed (or, attached, the main) thread first. source: 'core FILE' or 'gdb attached to
    pid N'.
    """

    source: str
    threads: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    pid: int | None = None
    note: str | None = None
    seconds: float = 0.0
    signal: int | None = None  # the signal that made the core (Linux's siginfo), None attached

    def as_dict(self) -> dict[str, Any]:
        """The "native" section of a crash report."""
        return {
            "source": self.source,
            "tool": "gdb",
            "pid": self.pid,
            "signal": self.signal,
            "seconds": round(self.seconds, 2),
            "note": self.note,
            "threads": self.threads,
            "images": self.images,
        }


def unavailable(source: str, note: str) -> NativeStacks:
    """No native stacks, and the one line saying why."""
    return NativeStacks(source, note=note)


def is_core(path: Path) -> bool:
    """True for an ELF core file (e_type ET_CORE), whatever its name."""
    try:
        with path.open("rb") as file:
            head = file.read(18)
    except OSError:
        return False
    if len(head) < 18 or head[:4] != b"\x7fELF":
        return False
    return int.from_bytes(head[16:18], "little" if head[5] == 1 else "big") == 4


def from_core(core: Path, executable: str, timeout: float = GDB_TIMEOUT) -> NativeStacks:
    """Every thread's stack in `core`, dumped by a process running `executable`; the crashed
    thread first (marked "crashed")."""
    stacks = _run_gdb([executable, str(core)], f"core {core}", timeout, crashed=True)
    return stacks


def from_pid(pid: int, timeout: float = GDB_TIMEOUT) -> NativeStacks:
    """Every thread's stack of the live process `pid` (gdb attaches, reads, detaches: the
    process goes on). Where ptrace is refused, the note says how to allow it."""
    return _run_gdb(["-p", str(pid)], f"gdb attached to pid {pid}", timeout, crashed=False)


def _run_gdb(target: list[str], source: str, timeout: float, crashed: bool) -> NativeStacks:
    gdb = shutil.which("gdb")
    if gdb is None:
        return unavailable(source, "gdb is not installed (apt install gdb)")
    limits = f"LIMITS = ({CRASHED_FRAMES}, {OTHER_FRAMES})\nMARK = {MARK!r}\n"
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="twotower-gdb-") as script:
        script.write(limits + GDB_SCRIPT)
        script.flush()
        command = [gdb, "-batch", "-nx", "-iex", "set auto-load off"]
        command += ["-iex", "set debuginfod enabled off", "-x", script.name, *target]
        try:
            out = subprocess.run(  # its own session: a Ctrl-C or torchrun's stop of our
                command,  # process group must not cut the read short
                capture_output=True,
                text=True,
                timeout=timeout,
                errors="replace",
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return unavailable(source, f"gdb took over {timeout:.0f} s")
        except OSError as error:
            return unavailable(source, f"gdb did not start ({error.strerror})")
    seconds = time.monotonic() - started
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        return unavailable(source, _why_not(out.stdout + out.stderr, target))
    found = json.loads(line[len(MARK) :])
    threads = [
        {"name": t["name"], "crashed": crashed and t["current"], "frames": t["frames"]}
        for t in found["threads"]
    ]
    for thread in threads:
        if thread["crashed"]:
            past_handlers(thread)
    signal = found["signal"] if crashed else None
    return NativeStacks(source, threads, found["images"], found["pid"], None, seconds, signal)


def past_handlers(thread: dict[str, Any]) -> None:
    """Drop the crashed thread's frames of the signal handlers that ran after the fault
    (faulthandler re-raising, torch's handler): everything down to the innermost signal
    trampoline, so frame 0 is where it faulted. Their count goes in "handler_frames"."""
    frames = thread["frames"]
    marks = [index for index, frame in enumerate(frames) if frame.pop("signal_frame", False)]
    if marks:
        thread["frames"] = frames[marks[-1] + 1 :]
        thread["handler_frames"] = marks[-1] + 1


def _why_not(output: str, target: list[str]) -> str:
    """One line from gdb's output saying why it read no stacks."""
    if "ptrace" in output and ("Operation not permitted" in output or "not permitted" in output):
        return (
            "ptrace refused (as root: sysctl kernel.yama.ptrace_scope=0, or "
            "give the watcher CAP_SYS_PTRACE)"
        )
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and "warning:" not in ln]
    last = lines[-1] if lines else "no output"
    return f"gdb read nothing from {' '.join(target[-1:])}: {last}"[:300]

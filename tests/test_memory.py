"""The one memory reader (`twotower.process.memory`) against independent readings:
psutil called here, and on Linux /proc parsed here, for this process, a child holding a known
amount of memory, and a process that has exited (None, not an error). The portable (psutil)
path is exercised on Linux too, so what used to be None off Linux is shown to have a value."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from twotower.guard.evidence import memory_limit_kb
from twotower.process import memory

LINUX = Path("/proc/self/status").exists()
MIB = 1024 * 1024
HELD_MIB = 64
# resident memory moves between two readings (allocator, imports, page faults): allow this much
DRIFT = 8 * MIB

# a child that touches HELD_MIB of anonymous memory and burns some CPU, then waits for stdin
HOLDER = f"""
import sys
held = bytearray({HELD_MIB} * 1024 * 1024)
for i in range(0, len(held), 4096):
    held[i] = 1
spent = sum(i * i for i in range(2_000_000))
print("ready", flush=True)
sys.stdin.readline()
"""


def kb_lines(path: Path) -> dict[str, int]:
    """Our own parse of a /proc file (status, meminfo): each 'Name: N kB' line in bytes."""
    found = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            found[name] = int(value.split()[0]) * 1024
    return found


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of /proc/PID/stat, in seconds (fields 14 and 15, after the comm)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def holder() -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    yield child
    child.communicate("\n", timeout=30)


def test_this_process_agrees_with_psutil_and_proc() -> None:
    reading = memory.process_memory()
    theirs = psutil.Process().memory_info().rss
    assert reading is not None and reading["pid"] == os.getpid()
    assert abs(reading["rss"] - theirs) < DRIFT
    assert reading["peak_rss"] >= reading["rss"] - DRIFT
    assert reading["cpu_s"] > 0
    if LINUX:
        status = kb_lines(Path("/proc/self/status"))
        assert abs(reading["rss"] - status["VmRSS"]) < DRIFT
        assert abs(reading["rss_anon"] - status["RssAnon"]) < DRIFT
        assert reading["peak_rss"] >= status["VmHWM"] - DRIFT


def test_a_child_agrees_with_psutil_and_proc(holder: subprocess.Popen[str]) -> None:
    reading = memory.process_memory(holder.pid)
    assert reading is not None and reading["pid"] == holder.pid
    # the child is idle now, so the readings agree closely
    assert abs(reading["rss"] - psutil.Process(holder.pid).memory_info().rss) < MIB
    assert reading["rss"] >= HELD_MIB * MIB
    assert memory.rss_kb(holder.pid) == pytest.approx(reading["rss"] / 1024, abs=MIB / 1024)
    if LINUX:
        status = kb_lines(Path(f"/proc/{holder.pid}/status"))
        assert abs(reading["rss"] - status["VmRSS"]) < MIB
        assert reading["rss_anon"] >= HELD_MIB * MIB
        assert reading["rss_anon"] == pytest.approx(status["RssAnon"], abs=MIB)
        assert reading["peak_rss"] == status["VmHWM"]
        assert reading["cpu_s"] == pytest.approx(proc_cpu_seconds(holder.pid), abs=0.05)


def test_a_process_tree_sums_its_descendants() -> None:
    """A shell that runs the holder: the shell alone is small, its tree holds HELD_MIB."""
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"\"{sys.executable}\" -c '{HOLDER}'; true"],  # true: no exec
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout is not None and shell.stdout.readline().strip() == "ready"
        [holder] = psutil.Process(shell.pid).children(recursive=True)
        assert memory.process_tree(shell.pid) == [shell.pid, holder.pid]
        alone, tree = memory.rss_kb(shell.pid), memory.rss_kb(shell.pid, tree=True)
        assert alone is not None and tree is not None
        assert alone < HELD_MIB * 1024 <= tree
        assert tree * 1024 == pytest.approx(
            sum(psutil.Process(pid).memory_info().rss for pid in (shell.pid, holder.pid)), abs=MIB
        )
    finally:
        shell.communicate("\n", timeout=30)
    assert memory.process_tree(shell.pid) == []


def test_an_exited_process_reads_as_none_not_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert memory.process_memory(child.pid) is None
    assert memory.rss_kb(child.pid) is None
    assert memory.peak_rss_kb(child.pid) is None


def test_an_exited_but_unreaped_process_reads_as_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        assert memory.process_memory(child.pid) is None
    finally:
        child.wait()


def test_the_portable_path_has_values_on_linux_too(holder: subprocess.Popen[str]) -> None:
    """What used to be None off Linux (another process's RSS, available memory, the limit)
    comes from psutil alone: the portable reading carries no Linux-only key."""
    reading = memory.portable_reading(holder.pid)
    assert reading is not None and set(reading) == {"pid", "rss", "cpu_s"}
    assert reading["rss"] >= HELD_MIB * MIB
    own = memory.portable_reading()
    assert own is not None and own["peak_rss"] > 0 and not set(own) & {"rss_anon", "rss_file"}
    machine = memory.machine_memory()
    assert 0 < machine["available"] <= machine["total"]
    assert machine["total"] == psutil.virtual_memory().total
    limit_kb, source = memory_limit_kb()
    assert 0 < limit_kb <= machine["total"] // 1024 and source
    if LINUX:
        meminfo = kb_lines(Path("/proc/meminfo"))
        assert machine["total"] == meminfo["MemTotal"]
        assert abs(machine["available"] - meminfo["MemAvailable"]) < 256 * MIB

"""Evidence about a process, read from outside it: its memory, its libraries, its last words.

How it ended is `twotower.process.exit_status.ExitStatus`. Here: `MemoryTrend` (RSS
samples, read through `twotower.process.memory`), the memory limit (physical memory
from psutil, on every platform; the cgroup's limit as a Linux addition), the
cgroup's OOM-kill counter, the kernel log (segfault and OOM-killer lines), and
the tracebacks in a child's stderr. `forensics` weighs them into causes.

The Linux additions (cgroup files, dmesg) are optional: on macOS, or where a
file is unreadable, that piece of evidence is None and the report says less.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from twotower.process.memory import machine_memory

TAIL_LINES = 40

# --- memory -----------------------------------------------------------------------------


class MemoryTrend:
    """RSS samples of one process as (seconds since start, step or None, KiB).

    At most `keep` samples are stored (every other one is dropped when full, so
    they stay evenly spread); the peak and the latest are always kept.
    """

    def __init__(self, keep: int = 256):
        self.keep = keep
        self.samples: list[tuple[float, int | None, int]] = []
        self.peak: tuple[float, int | None, int] | None = None
        self.latest: tuple[float, int | None, int] | None = None
        self._stride = 1
        self._seen = 0

    def add(self, seconds: float, rss_kb: int, step: int | None = None) -> None:
        """Record one sample."""
        sample = (round(seconds, 2), step, int(rss_kb))
        self.latest = sample
        if self.peak is None or rss_kb > self.peak[2]:
            self.peak = sample
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        self.samples.append(sample)
        if len(self.samples) > self.keep:
            self.samples = self.samples[::2]
            self._stride *= 2

    def describe(self) -> str:
        """'RSS 120 MB at 0 s -> peak 460 MB at 31 s (step 40) -> 455 MB at 35 s: +9.4 MB/min'."""
        if self.peak is None or self.latest is None:
            return "no RSS samples"
        first = self.samples[0]
        peak, last = self.peak, self.latest
        step = f" (step {peak[1]})" if peak[1] is not None else ""
        text = (
            f"RSS {size_text(first[2])} at {first[0]:g} s -> peak {size_text(peak[2])} at "
            f"{peak[0]:g} s{step} -> {size_text(last[2])} at {last[0]:g} s"
        )
        if last[0] - first[0] >= 30:  # a slope over less is noise
            per_minute = (last[2] - first[2]) / (last[0] - first[0]) * 60
            text += f": {'+' if per_minute >= 0 else '-'}{size_text(abs(per_minute))}/min"
        return text

    def as_dict(self) -> dict[str, Any]:
        """The trend for a report: its description, peak and samples."""
        return {
            "trend": self.describe(),
            "peak_sampled_kb": self.peak[2] if self.peak else None,
            "samples": [list(sample) for sample in self.samples],
        }


def size_text(kib: float) -> str:
    """KiB as '412 MB' or '1.23 GB'."""
    if kib >= 1024 * 1024:
        return f"{kib / 1024 / 1024:.2f} GB"
    return f"{kib / 1024:.0f} MB"


def memory_limit_kb() -> tuple[int, str]:
    """The memory this process tree may use, in KiB, and where that figure comes from:
    the tighter of the physical memory (psutil) and the cgroup limit (a Linux addition)."""
    limits = [(machine_memory()["total"], "physical memory")]
    cgroup = _cgroup_dir()
    if cgroup is not None:
        version, leaf, root = cgroup
        name = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        for directory in [leaf, *leaf.parents]:
            value = _read_text(directory / name)
            if value and value.isdigit() and int(value) < 1 << 60:
                limits.append((int(value), f"cgroup {directory / name}"))
            if directory == root:
                break
    limit, source = min(limits)
    return limit // 1024, source


def oom_kill_count() -> int | None:
    """The OOM kills counted in this process's memory cgroup (Linux), None where unreadable."""
    cgroup = _cgroup_dir()
    if cgroup is None:
        return None
    version, leaf, _ = cgroup
    text = _read_text(leaf / ("memory.events" if version == "v2" else "memory.oom_control"))
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def _cgroup_dir() -> tuple[str, Path, Path] | None:
    """(version, this process's memory cgroup directory, the hierarchy's root), where mounted."""
    text = _read_text(Path("/proc/self/cgroup"))
    if text is None:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        root = Path("/sys/fs/cgroup/memory")
        if "memory" in controllers.split(",") and (root / path.lstrip("/")).is_dir():
            return "v1", root / path.lstrip("/"), root
    for line in text.splitlines():
        root = Path("/sys/fs/cgroup")
        if line.startswith("0::") and (root / "cgroup.controllers").exists():
            return "v2", root / line[3:].lstrip("/"), root
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def kernel_log(pid: int) -> list[str] | None:
    """Kernel log (dmesg) lines about `pid`: segfaults with the library, OOM kills.

    None where the log cannot be read (macOS, or dmesg restricted to root).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    about = re.compile(rf"\[{pid}\]:|[Kk]illed process {pid}\b|pid={pid},")
    return [line.strip() for line in out.stdout.splitlines() if about.search(line)]


# --- tracebacks -------------------------------------------------------------------------


def fatal_error_dump(text: str) -> str | None:
    """faulthandler's last 'Fatal Python error' section in `text` (a child's stderr), or None."""
    start = text.rfind("Fatal Python error:")
    return text[start:].strip() if start >= 0 else None


def python_traceback(text: str) -> str | None:
    """The last Python traceback in `text`, to its end (the exception line), or None."""
    start = text.rfind("Traceback (most recent call last):")
    return text[start:].strip() if start >= 0 else None


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of `text`, progress-bar carriage returns read as line ends."""
    return "\n".join(text.replace("\r", "\n").strip().splitlines()[-lines:])

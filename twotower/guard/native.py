"""Native frames for a watched child's report: from its core after a crash, by attaching
before the watchdog's SIGKILL, or from the crash report macOS writes for it.

`NativeWatch` is armed once when the child starts (`allow`: RLIMIT_CORE for the child alone,
per `process.cores.CorePlan`; nothing runs while the child does) and asked afterwards:
`after_crash` reads the core with gdb (`process.native_stacks`) and deletes it unless kept, or,
on macOS, waits a bounded time for the .ips whose pid is the child's (`diagnose.ips`);
`before_kill` attaches gdb to a hung child. Each returns a report's "native" section, which
always says in `note` why there are no frames where there are none.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from twotower.diagnose import ips
from twotower.diagnose.explain import crash_lines
from twotower.process import native_stacks
from twotower.process.cores import CorePlan

IPS_WAIT = 20.0  # seconds to wait for macOS's crash reporter to write the child's .ips
REPORTS_ENV = "TWOTOWER_CRASH_REPORTS"  # where macOS crash reports are looked for (tests)


class NativeWatch:
    """Native evidence about one child started in `cwd`; see the module docstring."""

    def __init__(
        self,
        cwd: Path,
        keep_core: bool | None = None,
        reports: Path | None = None,
        ips_wait: float = IPS_WAIT,
    ):
        self.plan = CorePlan.prepare(cwd, keep_core)
        self.reports = reports or Path(os.environ.get(REPORTS_ENV) or ips.REPORTS)
        self.ips_wait = ips_wait
        self.started = time.time()
        self.executable: str | None = None

    def allow(self, pid: int) -> None:
        """Just after the child `pid` started: its core limit (nothing when no core is
        planned)."""
        self.plan.allow(pid)

    def after_crash(
        self, pid: int, signal: str | None, dumped: bool, command: list[str]
    ) -> dict[str, Any] | None:
        """The "native" section for a child that died by `signal` (None: not a native crash).

        dumped: the kernel says it wrote a core (WCOREDUMP).
        """
        if signal not in native_stacks.CRASH_SIGNALS:
            return None
        if sys.platform == "darwin" or self.reports != ips.REPORTS:
            found = self.from_crash_report(pid)
            if found is not None:
                return found
            if sys.platform == "darwin":
                return _none("macOS", f"no crash report for pid {pid} in {self.reports}")
        executable = self.executable or shutil.which(command[0]) or command[0]
        return self.plan.native_section(pid, executable, self.started, dumped)

    def after_crash_safely(
        self, pid: int, signal: str | None, dumped: bool, command: list[str]
    ) -> dict[str, Any] | None:
        """`after_crash`, where a failure of its own becomes the section's note: the report,
        the restart and the engine switch never depend on native frames."""
        try:
            return self.after_crash(pid, signal, dumped, command)
        except Exception as error:  # noqa: BLE001 - any failure here must cost only the frames
            return _none("core", f"native frames failed: {type(error).__name__}: {error}")

    def before_kill(self, pid: int) -> dict[str, Any]:
        """The "native" section of a hung child, read by attaching gdb (it stays stopped only
        while gdb reads)."""
        if sys.platform == "darwin":
            return _none("attach", "no native stacks of a hang on macOS (gdb cannot attach)")
        try:
            return native_stacks.from_pid(pid).as_dict()
        except Exception as error:  # noqa: BLE001 - the SIGKILL must follow whatever happens
            return _none("attach", f"native stacks failed: {type(error).__name__}: {error}")

    def from_crash_report(self, pid: int) -> dict[str, Any] | None:
        """The .ips macOS writes for `pid` (waited for up to `ips_wait` s, in `reports`: on
        Linux only where one is named), as a "native" section with the explanation's lines;
        None if none came."""
        path = ips.report_for_pid(pid, self.reports, self.started, self.ips_wait)
        if path is None:
            return None
        crash = ips.read_ips(path)
        return {
            "source": f"macOS crash report {path}",
            "tool": "ips",
            "pid": crash.pid,
            "note": None,
            "exception": crash.exception,
            "messages": list(crash.messages),
            "threads": [
                {
                    "name": crash.thread,
                    "crashed": True,
                    "frames": [frame.as_dict() for frame in crash.frames],
                }
            ],
            "images": list(crash.images),
            "explain": crash_lines(crash),
        }


def _none(source: str, note: str) -> dict[str, Any]:
    return native_stacks.unavailable(source, note).as_dict()

"""`twotower watch -- COMMAND...`: any training command under the supervisor's eyes, minus
checkpoints and restarts (the command is not ours to resume).

The command runs without a shell, unbuffered, with faulthandler on through
PYTHONFAULTHANDLER (a Python child prints every thread's traceback on a fatal
signal); its stderr goes through to ours and into OUT/run-N.stderr.txt; the RSS
(psutil, every platform) and OpenMP runtimes (psutil's memory maps: not on
macOS) of the command and every process it starts are sampled. If it ends abnormally, its exit
is decoded and OUT/run-N.json holds the same report the supervisor writes
(`forensics.examine`), with the summary on stderr. Its exit code is passed
through, 128 + N for signal N as a shell reports it.

Limitation: the sampled RSS is the sum over those processes, so a page they
share (a fork's copy-on-write pages) counts once per process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from twotower.errors import UsageError
from twotower.guard import forensics
from twotower.guard.monitor import SignalForwarder, WatchedChild, child_env
from twotower.guard.supervisor import next_number
from twotower.process import faults

DEFAULT_OUT = Path("twotower-watch")


def watch(command: Sequence[str], out: str | Path = DEFAULT_OUT, keep_core: bool = False) -> int:
    """Run `command` watched; write OUT/run-N.json if it crashes, with its native frames (from
    its core, deleted afterwards unless `keep_core`). Returns its exit code (128 + N if signal
    N ended it). Raises UsageError for an empty or unrunnable command."""
    if not command:
        raise UsageError("watch: give the command after --, e.g. twotower watch -- python train.py")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    number = next_number(folder)
    stderr_copy = folder / f"run-{number}.stderr.txt"
    with SignalForwarder() as signals:
        child = WatchedChild(
            command,
            child_env(),
            signals,
            stderr_copy=stderr_copy,
            tree=True,
            keep_core=keep_core or None,
        )
        outcome = child.run()
    if outcome.crashed:
        armed = faults.parse_faults(os.environ.get(faults.ENV_VAR))
        report = forensics.examine(outcome, f"run {number}", armed, stderr_file=str(stderr_copy))
        path = forensics.write_report(folder / f"run-{number}.json", report)
        print("twotower: " + "\n".join(forensics.summary_lines(report)), file=sys.stderr)
        print(f"  report: {path}", file=sys.stderr, flush=True)
    return outcome.exit.shell_code()

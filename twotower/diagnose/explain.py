"""`twotower explain PATH`: the crash reports a user already has, explained without running
anything again.

PATH is a macOS crash report (`.ips`, macOS 12 and later; or the text of `.crash` files and of
Console's "Translated Report"), a twotower crash report (the JSON
under RUN/crashes/ or twotower-watch/), a directory holding them (a run directory: its newest
crash), or a Linux core (read with gdb against `--exe`, default this Python). `--latest` takes
the newest Python*.ips under ~/Library/Logs/DiagnosticReports. The answer: what died and how
(exception, signal, assertion messages), the faulting thread's native frames with their images,
and the known crashes that fit (`diagnose.known_crashes`), each with what to do and where it is
discussed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from twotower.diagnose import ips
from twotower.diagnose.crash_text import looks_like_crash_text, read_crash_text
from twotower.diagnose.known_crashes import matching
from twotower.diagnose.native_crash import NativeCrash, frame_lines, from_report
from twotower.errors import UsageError
from twotower.process import native_stacks
from twotower.process.exit_status import signal_name

FRAMES_SHOWN = 16
REPORT_NAME = re.compile(r"^((attempt|run|rank\d+-attempt)-\d+|miner-.+)\.json$|\.(ips|crash)$")


def explain(
    path: str | Path | None = None,
    latest: bool = False,
    folder: Path | None = None,
    executable: str | None = None,
) -> str:
    """The explanation of the crash report at `path` (or, with `latest`, of the newest
    Python*.ips in `folder`, default ~/Library/Logs/DiagnosticReports), as text. A Linux core
    is read with gdb against `executable` (default: this Python).

    Raises UsageError (one line naming the file and what is wrong) for anything else.
    """
    if latest:
        target = ips.latest_report(folder)
    elif path is None:
        raise UsageError("explain: give a crash report (.ips, a twotower report) or --latest")
    else:
        target = Path(path)
    if target.is_dir():
        target = newest_report(target)
    if not target.exists():
        raise UsageError(f"{target}: no such file")
    if target.suffix == ".ips":
        return "\n".join(crash_lines(ips.read_ips(target)))
    if native_stacks.is_core(target):
        return "\n".join(crash_lines(core_crash(target, executable or sys.executable)))
    if target.suffix == ".crash" or looks_like_crash_text(_head(target)):
        return "\n".join(crash_lines(read_crash_text(target)))
    return "\n".join(report_lines(target, read_report(target)))


def _head(path: Path) -> str:
    """The start of a file as text ('' when unreadable: the reader that follows says why)."""
    try:
        with path.open(errors="replace") as file:
            return file.read(8000)
    except OSError:
        return ""


def core_crash(core: Path, executable: str) -> NativeCrash:
    """The crash a Linux core holds, read with gdb against `executable`. Raises UsageError
    when gdb reads nothing from it."""
    stacks = native_stacks.from_core(core, executable)
    if stacks.note is not None:
        raise UsageError(f"{core}: {stacks.note}")
    report = {
        "label": f"core {core}",
        "pid": stacks.pid,
        "command": [executable],
        "exit": {"signal": signal_name(stacks.signal) if stacks.signal else None},
        "native": stacks.as_dict(),
    }
    crash = from_report(report)
    return dataclasses.replace(crash, source=str(core), process=executable, termination=None)


def newest_report(folder: Path) -> Path:
    """The newest crash report in `folder`, its crashes/ or a twotower-watch/ inside it: a
    twotower report by its name (attempt-N, run-N, rankR-attempt-A, miner-...), an .ips or a
    .crash; a run's other JSON files (config, heartbeat) are not reports."""
    candidates = [
        path
        for where in (folder, folder / "crashes", folder / "twotower-watch")
        if where.is_dir()
        for path in where.iterdir()
        if REPORT_NAME.match(path.name)
    ]
    if not candidates:
        raise UsageError(f"{folder}: no crash report in it (nor in its crashes/)")
    return max(candidates, key=lambda path: (path.stat().st_mtime, path.name))


def read_report(path: Path) -> dict[str, Any]:
    """A twotower crash report. Raises UsageError naming the file if it is not one."""
    try:
        report = json.loads(path.read_text(errors="replace"))
    except OSError as error:
        raise UsageError(f"{path}: cannot read it: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(report, dict) or not {"exit", "causes"} <= report.keys():
        raise UsageError(f"{path}: not a twotower crash report (no 'exit' and 'causes')")
    return report


def crash_lines(crash: NativeCrash) -> list[str]:
    """A native crash in words: who died, how, the faulting frames, the known causes."""
    who = crash.process or "a process"
    how = ", ".join(filter(None, [crash.exception, crash.signal])) or "unknown"
    lines = [f"{crash.source}: {who}" + (f" (pid {crash.pid})" if crash.pid else "")]
    lines.append(f"  died: {how}" + (f"; {crash.termination}" if crash.termination else ""))
    if crash.messages:
        lines.append("  messages:")
        lines.extend(f"    {message}" for message in crash.messages)
    lines.extend(native_lines(crash))
    return lines + cause_lines(crash)


def native_lines(crash: NativeCrash) -> list[str]:
    """The faulting thread's frames (or the notes saying why there are none)."""
    lines = [f"  native: {note}" for note in crash.notes]
    if crash.frames:
        of = f" of {crash.threads} threads" if crash.threads else ""
        role = "main thread at the hang" if crash.hang else "faulting thread"
        lines.append(f"  {role} ({crash.thread or 'unnamed'}{of}), innermost first:")
        lines.extend(f"    {line}" for line in frame_lines(crash.frames, FRAMES_SHOWN))
    if crash.images:
        lines.append(f"  images loaded: {len(crash.images)}")
    return lines


def cause_lines(crash: NativeCrash) -> list[str]:
    """The known crashes that fit, each with evidence, what to do and its issues."""
    found = matching(crash)
    if not found:
        return ["  known causes: none of the table's rows fit (twotower.diagnose.known_crashes)"]
    lines = ["  known causes that fit:"]
    for row, evidence in found:
        lines.append(f"    {row.name}: {row.cause}")
        lines.extend(f"      evidence: {item}" for item in evidence)
        lines.append(f"      what to do: {row.action}")
        lines.append(f"      see: {', '.join(row.issues)}")
    return lines


def report_lines(path: Path, report: dict[str, Any]) -> list[str]:
    """A twotower report in words: its own verdict, then its native frames and known causes."""
    where = report.get("where") or {}
    place = f" in phase {where.get('phase')} at step {where.get('step')}" if where else ""
    lines = [f"{path}: {report.get('label')} (pid {report.get('pid')})"]
    lines.append(f"  died: {report['exit'].get('description')}{place}")
    crash = from_report(report)
    if crash.messages:
        lines.append("  messages (stderr):")
        lines.extend(f"    {message}" for message in crash.messages[-8:])
    if not report.get("native") and report["exit"].get("signal") in native_stacks.CRASH_SIGNALS:
        lines.append("  native: none in this report (written before twotower kept native frames)")
    lines.extend(native_lines(crash))
    for cause in report["causes"]:
        lines.append(f"  {cause['confidence']} cause (the report's): {cause['cause']}")
        lines.append(f"    what to do: {cause['mitigation']}")
    return lines + cause_lines(crash)

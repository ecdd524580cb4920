"""macOS crash reports (`.ips`, macOS 12 and later) read into a `NativeCrash`.

The format (Apple's "Interpreting the JSON format of a crash report"): the first line is a
JSON header (`app_name`, `bug_type` "309" for a crash, `os_version`, ...), the rest one JSON
body: `pid`, `procName`, `exception` {type, signal, subtype, codes}, `termination`
{indicator, namespace, code}, `asi` {image name: [assertion messages]}, `faultingThread` (an
index into `threads`), each thread's `frames` [{imageIndex, imageOffset, symbol,
symbolLocation}] and `usedImages` [{name, path, base}]. `latest_report` finds the newest
report of a process under ~/Library/Logs/DiagnosticReports; `report_for_pid` waits a bounded
time for the one the crash reporter writes for a pid.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from twotower.diagnose.native_crash import NativeCrash, NativeFrame
from twotower.errors import UsageError

REPORTS = Path.home() / "Library" / "Logs" / "DiagnosticReports"
CRASH_BUG_TYPES = ("309",)  # 309: a process crash; 298 is a jetsam event, 288 a stackshot


def read_ips(path: Path) -> NativeCrash:
    """The crash in `path`. Raises UsageError (one line naming the file) for a file that is
    not a macOS 12+ crash report."""
    header, body = _split(path)
    bug_type = str(header.get("bug_type", body.get("bug_type", "")))
    if bug_type and bug_type not in CRASH_BUG_TYPES:
        raise UsageError(f"{path}: a macOS report of bug_type {bug_type}, not a crash (309)")
    threads = body.get("threads")
    if not isinstance(threads, list) or "exception" not in body:
        raise UsageError(f"{path}: no 'exception' and 'threads' in its body: not a crash report")
    images = [image if isinstance(image, dict) else {} for image in body.get("usedImages") or []]
    faulting = body.get("faultingThread", 0)
    if not isinstance(faulting, int) or not 0 <= faulting < len(threads):
        raise UsageError(f"{path}: faultingThread {faulting!r} is not one of its threads")
    thread = threads[faulting]
    frames = tuple(_frame(frame, images) for frame in thread.get("frames") or [])
    exception = body["exception"] or {}
    termination = body.get("termination") or {}
    return NativeCrash(
        source=str(path),
        process=body.get("procName") or header.get("name") or header.get("app_name"),
        pid=body.get("pid"),
        signal=exception.get("signal"),
        exception=_exception_text(exception),
        termination=termination.get("indicator"),
        messages=tuple(_messages(body.get("asi") or {})),
        thread=_thread_name(faulting, thread),
        frames=frames,
        images=tuple(filter(None, (image.get("path") or image.get("name") for image in images))),
        threads=len(threads),
    )


def _split(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, body) of an .ips; UsageError naming the file for anything else."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise UsageError(f"{path}: cannot read it: {error.strerror}") from None
    first, _, rest = text.lstrip().partition("\n")
    try:
        header = json.loads(first)
        body = json.loads(rest) if rest.strip() else {}
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{path}: not JSON where an .ips has it ({error.msg}, line {error.lineno})"
        ) from None
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise UsageError(f"{path}: its header and body are not JSON objects")
    if not body and "threads" in header:  # a report saved as one JSON object
        return {}, header
    return header, body


def _frame(frame: dict[str, Any], images: list[dict[str, Any]]) -> NativeFrame:
    index = frame.get("imageIndex")
    image = images[index] if isinstance(index, int) and 0 <= index < len(images) else {}
    symbol = frame.get("symbol")
    offset = frame.get("symbolLocation") if symbol else frame.get("imageOffset")
    base, image_offset = image.get("base"), frame.get("imageOffset")
    address = (
        base + image_offset if isinstance(base, int) and isinstance(image_offset, int) else None
    )
    return NativeFrame(image.get("name") or image.get("path"), symbol, offset, address)


def _exception_text(exception: dict[str, Any]) -> str | None:
    kind = exception.get("type")
    if not kind:
        return None
    subtype = exception.get("subtype")
    return f"{kind} ({subtype})" if subtype else kind


def _messages(asi: dict[str, Any]) -> list[str]:
    """The `asi` (application-specific information) messages, each prefixed by its image."""
    found = []
    for image, messages in asi.items():
        for message in messages if isinstance(messages, list) else [messages]:
            found.append(f"{image}: {str(message).strip()}")
    return found


def _thread_name(index: int, thread: dict[str, Any]) -> str:
    name = f"thread {index}"
    label = thread.get("name") or thread.get("queue")
    return f"{name} ({label})" if label else name


def reports_folder(folder: Path | None = None) -> Path:
    """Where macOS keeps crash reports (or `folder`). Raises UsageError off macOS when it
    is not there."""
    folder = folder or REPORTS
    if not folder.is_dir():
        where = "" if sys.platform == "darwin" else " (crash reports are a macOS thing)"
        raise UsageError(f"--latest: no crash reports folder {folder}{where}")
    return folder


def latest_report(folder: Path | None = None, process: str = "Python") -> Path:
    """The newest `PROCESS*.ips` in the crash reports folder. Raises UsageError if none."""
    where = reports_folder(folder)
    found = sorted(where.glob(f"{process}*.ips"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise UsageError(f"--latest: no {process}*.ips crash report in {where}")
    return found[-1]


def report_for_pid(pid: int, folder: Path, since: float, wait: float) -> Path | None:
    """The .ips in `folder` written at or after `since` whose body's pid is `pid`, waiting up
    to `wait` seconds for the crash reporter to write it; None if none came."""
    deadline = time.monotonic() + wait
    seen: set[Path] = set()
    while True:
        for path in sorted(folder.glob("*.ips")) if folder.is_dir() else []:
            try:
                if path in seen or path.stat().st_mtime < since - 1:
                    continue
                _, body = _split(path)
            except (OSError, UsageError):
                continue  # gone, or still being written: read again next round
            seen.add(path)
            if body.get("pid") == pid:
                return path
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)

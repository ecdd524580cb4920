"""macOS crash reports as text: the `.crash` files of macOS 11 and earlier, and the "Translated
Report" that Console and the crash dialog show (and users paste) on macOS 12 and later.

The layout (Apple's technote TN2151, "Understanding and Analyzing Application Crash Reports"):
header lines `Process:  Python [3557]`, `Exception Type:  EXC_BAD_ACCESS (SIGSEGV)`,
`Exception Codes:`, `Termination Reason:`; an `Application Specific Information:` block (the
assertion messages); one block per thread, the crashed one headed `Thread N Crashed:` with
frames `0   libsystem_kernel.dylib   0x197c36388 __pthread_kill + 8`; and `Binary Images:`,
one line per image ending in its path. `read_crash_text` turns it into a `NativeCrash`.
"""

from __future__ import annotations

import re
from pathlib import Path

from twotower.diagnose.native_crash import NativeCrash, NativeFrame
from twotower.errors import UsageError

FIELD = re.compile(r"^([A-Za-z][A-Za-z ]+):\s+(.*)$")
CRASHED = re.compile(r"^Thread (\d+) Crashed:?:?\s*(.*)$")
THREAD = re.compile(r"^Thread (\d+)")
FRAME = re.compile(r"^(\d+)\s+(\S+)\s+(0x[0-9a-fA-F]+)\s+(.*?)\s*$")
AT = re.compile(r"^(.*?) \+ (\d+)(?: \(.*\))?$")  # 'symbol + 8' or 'symbol + 8 (file.c:12)'
IMAGE = re.compile(r"^\s*0x[0-9a-fA-F]+\s*-\s*\S+\s+\+?(\S+).*?(/\S.*)$")


def looks_like_crash_text(text: str) -> bool:
    """True for a text crash report: its `Process:` and `Exception Type:` header lines."""
    head = text[:8000]
    return "Exception Type:" in head and re.search(r"^Process:", head, re.M) is not None


def read_crash_text(path: Path) -> NativeCrash:
    """The crash in the text report `path`. Raises UsageError (one line naming the file) when
    it has no crashed thread."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as error:
        raise UsageError(f"{path}: cannot read it: {error.strerror}") from None
    fields = {m.group(1).strip(): m.group(2).strip() for m in map(FIELD.match, lines) if m}
    start = next((i for i, line in enumerate(lines) if CRASHED.match(line)), None)
    if start is None or "Exception Type" not in fields:
        raise UsageError(f"{path}: no 'Exception Type' and 'Thread N Crashed' in it")
    crashed = CRASHED.match(lines[start])
    assert crashed is not None
    frames = []
    for line in lines[start + 1 :]:
        match = FRAME.match(line)
        if match is None:
            break
        frames.append(_frame(match))
    process = re.match(r"(.*?)\s*\[(\d+)\]", fields.get("Process", ""))
    kind = fields["Exception Type"]
    signal = re.search(r"\((SIG[A-Z]+)\)", kind)
    codes = fields.get("Exception Codes")
    exception = kind.split(" (")[0] + (f" ({codes})" if codes else "")
    return NativeCrash(
        source=str(path),
        process=process.group(1) if process else fields.get("Process"),
        pid=int(process.group(2)) if process else None,
        signal=signal.group(1) if signal else None,
        exception=exception,
        termination=fields.get("Termination Reason") or fields.get("Termination Signal"),
        messages=tuple(_block(lines, "Application Specific Information:")),
        thread=f"thread {crashed.group(1)}"
        + (f" ({crashed.group(2)})" if crashed.group(2) else ""),
        frames=tuple(frames),
        images=tuple(_images(lines)),
        threads=sum(1 for line in lines if THREAD.match(line) and "State" not in line),
    )


def _frame(match: re.Match[str]) -> NativeFrame:
    image, address, rest = match.group(2), int(match.group(3), 16), match.group(4)
    at = AT.match(rest)
    if at is None or at.group(1).startswith("0x"):  # unsymbolicated: 'base + offset'
        offset = int(at.group(2)) if at else None
        return NativeFrame(image, None, offset, address)
    return NativeFrame(image, at.group(1), int(at.group(2)), address)


def _block(lines: list[str], title: str) -> list[str]:
    """The non-empty lines after `title`, up to the first blank line."""
    if title not in lines:
        return []
    found = []
    for line in lines[lines.index(title) + 1 :]:
        if not line.strip():
            break
        found.append(line.strip())
    return found


def _images(lines: list[str]) -> list[str]:
    if "Binary Images:" not in lines:
        return []
    paths = []
    for line in lines[lines.index("Binary Images:") + 1 :]:
        match = IMAGE.match(line)
        if match is None:
            if not line.strip():
                break
            continue
        paths.append(match.group(2).strip())
    return paths

"""The native part of a crash report: its summary lines and the known crashes it shows.

`forensics.examine` puts `guard.native`'s section under "native"; here it becomes the
summary's "native frames" lines (the crashed thread's library, symbol and offset, or the one
line saying why there are none) and, matched against `diagnose.known_crashes`, causes.
"""

from __future__ import annotations

from typing import Any

from twotower.diagnose.known_crashes import matching
from twotower.diagnose.native_crash import NativeFrame, frame_lines, from_report


def known_causes(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The known native crashes (`diagnose.known_crashes`) the report's native frames, images
    and stderr show, each a 'likely' cause (as a report holds one) naming its row and issues."""
    if not report.get("native") or not report["native"].get("threads"):
        return []
    return [
        {
            "confidence": "likely",
            "cause": f"{row.cause} (known crash {row.name})",
            "evidence": evidence,
            "mitigation": f"{row.action}; see {', '.join(row.issues)}",
        }
        for row, evidence in matching(from_report(report))
    ]


def native_summary(native: dict[str, Any] | None, frames: int = 12) -> list[str]:
    """The native part of the summary: the crashed (or main) thread's frames with their
    libraries, or the one line saying why there are none."""
    if not native:
        return []
    if native.get("note") and not native.get("threads"):
        return [f"  native frames: none ({native['note']})"]
    threads = native.get("threads") or []
    first = next((t for t in threads if t.get("crashed")), threads[0] if threads else None)
    if first is None:
        return []
    role = "crashed thread" if first.get("crashed") else "main thread"
    after = (
        f", after {first['handler_frames']} frames of signal handlers"
        if first.get("handler_frames")
        else ""
    )
    lines = [f"  native frames ({native['source']}; {role} {first['name']}{after}):"]
    stack = tuple(NativeFrame.from_dict(frame) for frame in first["frames"])
    lines.extend(f"    {line}"[:200] for line in frame_lines(stack, frames))
    if len(threads) > 1:
        lines.append(f"    ({len(threads) - 1} more threads in the report)")
    if native.get("note"):
        lines.append(f"    note: {native['note']}")
    return lines

"""`NativeCrash`: what one native crash left behind, whatever wrote it down.

A macOS crash report (`diagnose.ips`), the native frames a Linux core or a debugger gave
(`process.native_stacks`, copied into a twotower crash report as `"native"`) and a twotower
report's own evidence all become this one shape, so the known-crash table
(`diagnose.known_crashes`) and `twotower explain` read one thing: the process, how it died
(exception, signal, the assertion and stderr messages), the faulting thread's frames with
their images, and the images loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any


@dataclass(frozen=True)
class NativeFrame:
    """One native frame: the image (library) it runs in, its symbol (demangled; None where the
    image exports none) and the offset from that symbol (or, without one, from the image)."""

    image: str | None
    symbol: str | None
    offset: int | None = None
    address: int | None = None

    def text(self) -> str:
        """'libtorch_cpu.so  at::native::sum_kernel_impl(...) + 52'."""
        where = self.symbol or (f"0x{self.address:x}" if self.address is not None else "??")
        offset = f" + {self.offset}" if self.offset is not None else ""
        return f"{self.image or '???'}  {where}{offset}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NativeFrame:
        """A frame as `as_dict` wrote it (a report's "native" section); a library's path becomes
        its file name."""
        library = data.get("library")
        image = PurePath(library).name if library else None
        return cls(image, data.get("symbol"), data.get("offset"), data.get("pc"))

    def as_dict(self) -> dict[str, Any]:
        """{"library", "symbol", "offset", "pc"}: a frame in a twotower report."""
        return {
            "library": self.image,
            "symbol": self.symbol,
            "offset": self.offset,
            "pc": self.address,
        }


@dataclass(frozen=True)
class NativeCrash:
    """A native crash: `source` names where it was read (a file, or "core of pid N").

    signal: 'SIGSEGV'; exception: Mach's 'EXC_BAD_ACCESS (KERN_INVALID_ADDRESS at 0x0)' on
    macOS, None elsewhere; messages: assertion messages (the .ips `asi`) and fatal lines from
    stderr; frames: the faulting thread's (at a hang, the main thread's), innermost first;
    images: paths (or names) of every loaded image.
    """

    source: str
    process: str | None = None
    pid: int | None = None
    signal: str | None = None
    exception: str | None = None
    termination: str | None = None
    messages: tuple[str, ...] = ()
    thread: str | None = None
    frames: tuple[NativeFrame, ...] = ()
    images: tuple[str, ...] = ()
    threads: int = 0
    notes: tuple[str, ...] = ()
    hang: bool = False  # the frames were taken from a hung process: nothing faulted

    def image_names(self) -> list[str]:
        """The loaded images' file names ('libomp.dylib')."""
        return [PurePath(image).name for image in self.images]


def frame_lines(frames: tuple[NativeFrame, ...], limit: int = 16) -> list[str]:
    """'#0  libsystem_kernel.dylib  __pthread_kill + 8' lines, at most `limit` of them."""
    lines = [f"#{index:<3d}{frame.text()}" for index, frame in enumerate(frames[:limit])]
    if len(frames) > limit:
        lines.append(f"... ({len(frames) - limit} more frames)")
    return lines


FATAL_LINES = re.compile(
    r"OMP: Error #\d+|terminate called|what\(\):|failed assertion|Assertion .* failed|"
    r"FaissException|Fatal Python error"
)


def from_report(report: dict[str, Any]) -> NativeCrash:
    """The native crash a twotower crash report describes: the crashing thread's native frames
    (for a hang, the main thread's) and the images of its "native" section (else its OpenMP
    runtimes), the fatal lines of its stderr tail as messages."""
    native = report.get("native") or {}
    threads = native.get("threads") or []
    crashed = next((thread for thread in threads if thread.get("crashed")), None)
    shown = crashed or (threads[0] if threads else {})  # a hang's: the main thread, first
    frames = tuple(NativeFrame.from_dict(frame) for frame in shown.get("frames", []))
    name = shown.get("name")
    stderr = report.get("stderr_tail") or ""
    messages = list(native.get("messages") or [])  # a macOS report's assertion messages
    messages += [line.strip() for line in stderr.splitlines() if FATAL_LINES.search(line)]
    exit_ = report.get("exit") or {}
    return NativeCrash(
        source=str(report.get("label", "a twotower report")),
        process=" ".join(report.get("command") or [])[:120] or None,
        pid=report.get("pid"),
        signal=exit_.get("signal"),
        exception=native.get("exception"),
        termination=exit_.get("description"),
        messages=tuple(messages),
        thread=name,
        frames=frames,
        images=tuple(native.get("images") or report.get("openmp") or ()),
        threads=len(threads),
        notes=tuple(filter(None, [native.get("note")])),
        hang=crashed is None and bool(threads),
    )

"""Replacing a file so that a reader, or a crash, never sees it half written.

The content goes to a temporary name beside the file and is renamed over it:
readers see the old file or the new one. `durable` also fsyncs the file and
its directory, so the new one survives a power loss, not only a crash.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(
    path: Path, content: bytes | str | Callable[[BinaryIO], object], durable: bool = False
) -> None:
    """Replace `path` with `content`: bytes, text (UTF-8), or a function that writes a file."""
    # per process and thread: two threads may replace one file (the heartbeat) at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode() if isinstance(content, str) else content)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)

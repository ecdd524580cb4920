"""Replacing a file so that a reader, or a crash, never sees it half written.

The content goes to a temporary name beside the file and is renamed over it:
readers see the old file or the new one. `durable` also fsyncs the file and
its directory, so the new one survives a power loss, not only a crash.
Every such write in twotower names its temporary file with `temporary_beside`
(`.NAME.tmp-PID-TID`), so a leftover is recognisable by `TEMPORARY_GLOB`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMPORARY_GLOB = ".*.tmp-*"  # what `temporary_beside` names look like in a directory


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_beside(path: Path) -> Path:
    """The temporary name of `path` while it is written: hidden, in the same directory (so
    the rename is atomic), and this process's and thread's own, since two threads may
    replace one file (the heartbeat) at once."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield `temporary_beside(path)` for the block to write (by name: a memory map, a
    library's save); when the block ends, rename it over `path`; when it raises, remove it.

    durable: fsync the file before the rename and the directory after it (flush memory
    maps first).
    """
    tmp = temporary_beside(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def replace_file(
    path: Path, content: bytes | str | Callable[[BinaryIO], object], durable: bool = False
) -> None:
    """Replace `path` with `content`: bytes, text (UTF-8), or a function that writes a file."""
    with replacing(path, durable) as tmp, open(tmp, "wb") as file:
        if callable(content):
            content(file)
        else:
            file.write(content.encode() if isinstance(content, str) else content)

"""Replacing a file so that a reader, or a crash, never sees it half written.

The content goes to a temporary name beside the file and is renamed over it:
readers see the old file or the new one. `durable` also fsyncs the file and
its directory, so the new one survives a power loss, not only a crash.
Every such write in twotower names its temporary file with `temporary_beside`
(`.NAME.tmp-PID-TID`), so a leftover is recognisable by `TEMPORARY_GLOB`. A directory
(an export) is built under that name and put in place by `replace_dir`: the earlier one is
swapped out, never deleted first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
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
def naming(path: Path) -> Iterator[None]:
    """Give an OSError raised in the block `path` as its file name where it names none (a
    write through a file object does not), so a full disk is reported with the file it hit."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


@contextlib.contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield `temporary_beside(path)` for the block to write (by name: a memory map, a
    library's save); when the block ends, rename it over `path`; when it raises, remove it.

    durable: fsync the file before the rename and the directory after it (flush memory
    maps first).
    """
    tmp = temporary_beside(path)
    try:
        with naming(path):
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


_RENAME_EXCHANGE = 2  # linux/fs.h: swap the two names in one step
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths' names atomically (Linux renameat2 RENAME_EXCHANGE); False where
    the system or the filesystem cannot (macOS, an old glibc, some network filesystems)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    names = (os.fsencode(first), os.fsencode(second))
    if renameat2(_AT_FDCWD, names[0], _AT_FDCWD, names[1], _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_dir(built: Path, path: Path) -> None:
    """Put the directory `built` (beside `path`, e.g. `temporary_beside(path)`) at `path`, over
    an earlier directory there. The earlier one is never deleted first: on Linux the two are
    swapped in one step; elsewhere the earlier one is renamed aside, then `built` renamed in
    (a crash between leaves it whole under its aside name). The earlier one is removed last.
    """
    if not path.exists():
        os.rename(built, path)
    elif _exchange(built, path):
        shutil.rmtree(built)
    else:
        aside = path.with_name(f".{path.name}.tmp-old-{os.getpid()}-{threading.get_ident()}")
        os.rename(path, aside)
        os.rename(built, path)
        shutil.rmtree(aside)
    fsync_dir(path.parent)

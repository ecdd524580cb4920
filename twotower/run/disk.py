"""A full disk as a cause of its own: a write of the run that fails with ENOSPC or EDQUOT
stops the run at once (`DiskFull`, exit code 4), naming the file, the free space there and
what to do; no restart, no engine switch. Checkpoints are committed by rename, so the newest
committed one stays loadable and `--resume` continues from it once there is room. At the
start, `room_warning` says when the disk cannot hold the checkpoints the run will keep."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from twotower.errors import DiskFull

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
STORES = ("checkpoints", "best")  # what the run keeps of its checkpoints


def bytes_text(count: float) -> str:
    """A byte count for people: '812 bytes', '3.0 KiB', '2.4 MiB', '1.23 GiB'."""
    if count < 2**10:
        return f"{count:.0f} bytes"
    if count < 2**20:
        return f"{count / 2**10:.1f} KiB"
    if count < 2**30:
        return f"{count / 2**20:.1f} MiB"
    return f"{count / 2**30:.2f} GiB"


def existing_parent(path: str | Path) -> Path:
    """`path` or its nearest ancestor that exists (where free space is measured)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def free_bytes(path: str | Path) -> int:
    """The bytes free to this user on the filesystem that holds (or would hold) `path`."""
    return shutil.disk_usage(existing_parent(path)).free


def disk_full_line(path: str | Path) -> str:
    """'disk full writing PATH (N free there now): ...' with what to do."""
    return (
        f"disk full writing {path} ({bytes_text(free_bytes(path))} free there now): free space on "
        "that disk, keep fewer checkpoints (--keep-checkpoints N) or train into another --out; "
        "--resume then continues from the newest checkpoint"
    )


@contextlib.contextmanager
def stops_on_full_disk(run: str | Path | None) -> Iterator[None]:
    """Turn an OSError with ENOSPC or EDQUOT raised in the block into `DiskFull` (the file it
    names, else the run directory `run`); every other error passes through unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        first = _first_full(error)  # a write while unwinding (the heartbeat) may fail too
        raise DiskFull(disk_full_line(first.filename or run or ".")) from error


def _first_full(error: BaseException) -> OSError:
    """The earliest disk-full OSError in `error`'s chain of exceptions raised while handling
    another (`__context__`): the write that hit the full disk first."""
    first = error
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            first = current
        current = current.__context__
    assert isinstance(first, OSError)
    return first


def kept_bytes(run: Path) -> int:
    """What the run's checkpoint stores (checkpoints/, best/) hold on disk now, in bytes."""
    files = (path for store in STORES for path in (run / store).rglob("*") if path.is_file())
    return sum(path.stat().st_size for path in files)


def room_warning(run: Path, checkpoint_bytes: int, keep: int) -> str | None:
    """One line when the disk of `run` cannot hold what the run will keep: `keep` checkpoints
    of `checkpoint_bytes`, one more while it is written (the oldest goes only after), and
    best/ (at most one more), beside what is kept already; None when it can."""
    need = (keep + 2) * checkpoint_bytes - kept_bytes(run)
    free = free_bytes(run)
    if free >= need:
        return None
    return (
        f"{run}: {bytes_text(free)} free, but the run keeps {keep} checkpoints of "
        f"{bytes_text(checkpoint_bytes)} (+1 while one is written, +1 in best/): it will stop "
        "when the disk is full; free space, pass --keep-checkpoints fewer, or another --out"
    )

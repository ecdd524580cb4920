"""Temp-then-rename writes (`twotower/atomic.py`): the one temporary name, the rename on
success, nothing left behind on failure, and a name per thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from twotower.atomic import TEMPORARY_GLOB, replace_file, replacing, temporary_beside


def test_replacing_renames_on_success_and_removes_the_temporary_on_failure(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.npy"
    path.write_text("old")
    with replacing(path, durable=True) as tmp:
        assert tmp.parent == tmp_path and list(tmp_path.glob(TEMPORARY_GLOB)) == []
        tmp.write_text("new")
        assert path.read_text() == "old"  # readers see the old file until the rename
    assert path.read_text() == "new" and not tmp.exists()
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "new" and list(tmp_path.glob(TEMPORARY_GLOB)) == []
    replace_file(path, b"bytes", durable=True)
    assert path.read_bytes() == b"bytes" and list(tmp_path.glob(TEMPORARY_GLOB)) == []


def test_two_threads_get_two_temporary_names(tmp_path: Path) -> None:
    """The heartbeat is replaced by the training and the mining thread: one shared
    temporary name would let one thread rename the other's half-written file."""
    path = tmp_path / "heartbeat.json"
    names: list[Path] = []
    thread = threading.Thread(target=lambda: names.append(temporary_beside(path)))
    thread.start()
    thread.join()
    assert names[0] != temporary_beside(path)
    assert all(name.match(TEMPORARY_GLOB) for name in (names[0], temporary_beside(path)))

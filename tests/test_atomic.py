"""Temp-then-rename writes (`twotower/atomic.py`): the one temporary name, the rename on
success, nothing left behind on failure, a name per thread, and a directory replaced without
ever being missing."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from twotower import atomic
from twotower.atomic import (
    TEMPORARY_GLOB,
    replace_dir,
    replace_file,
    replacing,
    temporary_beside,
)


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


def built_dir(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "tower.json").write_text(content)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["swapped", "renamed-aside"])
def test_replace_dir_puts_the_new_directory_over_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # as on macOS, or a filesystem without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    out = tmp_path / "export"
    replace_dir(built_dir(temporary_beside(out), "first"), out)  # nothing there yet
    replace_dir(built_dir(temporary_beside(out), "second"), out)
    assert (out / "tower.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old one is gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RENAME_EXCHANGE is Linux's")
def test_a_reader_never_finds_the_directory_missing_while_it_is_replaced(tmp_path: Path) -> None:
    """The earlier directory is swapped out, never deleted first: a reader polling it while it
    is replaced 200 times always finds a whole one."""
    out = built_dir(tmp_path / "export", "0")
    missing: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                (out / "tower.json").read_text()
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for number in range(1, 201):
            replace_dir(built_dir(temporary_beside(out), str(number)), out)
    finally:
        done.set()
        reader.join()
    assert (out / "tower.json").read_text() == "200" and missing == []

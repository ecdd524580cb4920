"""A full disk is a cause of its own (twotower/run/disk.py), on a real filesystem that fills
up: a 3 MiB tmpfs mounted for the test (root only; skipped where mount is not permitted).
The supervised run warns at its start that the disk cannot hold its checkpoints, stops at the
first write the kernel refuses with ENOSPC (exit 4, one line naming the file and the free
space; no restart, no engine switch), keeps its newest committed checkpoint loadable, and once
the filesystem has room `--resume` ends bit for bit equal to a run on a roomy disk."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import run_twotower
from tests.runs import TRAIN_ARGS, assert_same_state
from twotower.data import synthesize
from twotower.run.disk import bytes_text, room_warning
from twotower.run.rundir import MetricsLog, read_metrics
from twotower.training.checkpoint import load_checkpoint

# A queue of 30000 x 16 float32 makes each checkpoint about 2.1 MiB: the one at step 7 fits in
# 3 MiB, the one at step 14 does not.
ARGS = (*(arg for arg in TRAIN_ARGS if arg != "--no-supervise"), "--queue-size", "30000")


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'not permitted'}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--backend", "numpy", *ARGS]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_resume_ends_bit_for_bit(
    small_disk: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    synthesize(data, samples=300, bank=300, dim=16, seq_len=6, seed=1)
    straight = tmp_path / "straight"
    roomy = run_twotower(*train_args(data, straight))
    assert roomy.returncode == 0, roomy.stderr

    out = small_disk / "run"
    full = run_twotower(*train_args(data, out))
    assert full.returncode == 4, full.stderr
    lines = full.stderr.splitlines()
    assert any("free, but the run keeps 2 checkpoints" in line for line in lines), full.stderr
    stops = [line for line in lines if "disk full writing" in line]
    assert len(stops) == 1, full.stderr
    assert f"{out}/checkpoints/.tmp-step-0000014-" in stops[0] and " free there now" in stops[0]
    assert "--keep-checkpoints" in stops[0] and "another --out" in stops[0]
    assert "restart" not in full.stderr and "switch" not in full.stderr
    assert sorted(p.name for p in (out / "supervisor").iterdir()) == ["attempt-1.json"]
    assert not list((out / "crashes").glob("*.json"))  # not a crash: nothing to report
    meta, _ = load_checkpoint(out)  # the newest committed checkpoint verifies
    assert meta["step"] == 7

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = run_twotower("train", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(out, straight)


def test_the_room_warning_counts_what_the_run_keeps(tmp_path: Path) -> None:
    """Enough room: no warning; a checkpoint size past the free space: one line naming both."""
    assert room_warning(tmp_path, 1024, keep=2) is None
    huge = 2**60
    line = room_warning(tmp_path, huge, keep=3)
    assert line is not None and "keeps 3 checkpoints" in line and bytes_text(huge) in line


def test_a_line_cut_by_a_full_disk_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "step", "step": 1}\n{"event": "step", "st')  # cut mid-line
    log = MetricsLog(path)
    log.write("start", step=1)
    log.close()
    assert [r["event"] for r in read_metrics(path)] == ["step", "start"]

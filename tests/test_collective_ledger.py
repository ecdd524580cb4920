"""The collective ledger: what a rank wrote survives its SIGKILL and is read by another
process, and `laggards` names exactly the ranks of the same attempt that fell behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.processes import REPO, child_env
from twotower.process.collective_ledger import LedgerEntry, laggards, ledger_path, read_ledger

WRITER = """
import os, signal, sys
from pathlib import Path
from twotower.process.collective_ledger import CollectiveLedger
ledger = CollectiveLedger(Path(sys.argv[1]), attempt=2)
with ledger.collective("gather", 3):
    pass
with ledger.collective("gradients", 4):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_rank_killed_inside_a_collective_leaves_it_entered(tmp_path: Path) -> None:
    path = ledger_path(tmp_path, 1)
    started = time.time()
    child = subprocess.run(
        [sys.executable, "-c", WRITER, str(path)], env=child_env(), cwd=REPO, check=False
    )
    assert child.returncode == -signal.SIGKILL  # no flush, no exit handler ran
    entry = read_ledger(path)
    assert entry is not None
    assert (entry.attempt, entry.entered, entry.left) == (2, 2, 1) and entry.waiting
    assert (entry.kind, entry.step) == ("gradients", 4)
    assert started - 1 <= entry.since <= time.time()
    assert entry.describe().startswith("in collective #2 (gradients, step 4) for ")


def test_a_missing_or_cut_ledger_reads_as_none(tmp_path: Path) -> None:
    assert read_ledger(tmp_path / "absent.bin") is None
    cut = tmp_path / "cut.bin"
    cut.write_bytes(b"\0" * 20)
    assert read_ledger(cut) is None


def entry(attempt: int, entered: int, left: int) -> LedgerEntry:
    return LedgerEntry(attempt, entered, left, step=6, kind="gradients", since=0.0)


def test_laggards_are_the_same_attempts_ranks_that_entered_fewer() -> None:
    ledgers = {
        0: entry(1, 30, 29),  # waiting in #30
        1: entry(1, 29, 29),  # stuck before it
        2: entry(1, 30, 29),  # waiting with rank 0
        3: entry(0, 12, 12),  # a file left by an earlier attempt: not evidence
    }
    assert laggards(ledgers, 0) == [1]
    assert laggards(ledgers, 2) == [1]
    assert laggards(ledgers, 1) == []  # rank 1 was not waiting in a collective
    assert laggards({1: entry(1, 29, 29)}, 0) == []  # this rank's ledger is unreadable

"""The thread budget: how many threads the trainer and its miner worker each use.

Each process's OpenMP and BLAS pools (and torch's) start one thread per core.
Two processes that compute at the same time with every core each oversubscribe
the machine: threads preempt each other and both slow down. The rule
(`thread_budget`), with C the cores this process may use (`usable_cores`):

- the miner searches inside the trainer's process (exact, or --miner-isolation
  none): mining blocks the step, so the trainer takes all C;
- the miner has its own worker and the trainer waits for each search (mining
  is synchronous): they take turns, so each takes all C;
- the worker searches while the trainer keeps stepping (mining overlaps
  training): the worker gets floor(C / 2), and the trainer the rest from the
  step a refresh is taken to the step it is used (`beside_search`, at least 1
  each): 1 + 1 on 2 cores, 4 + 4 on 8, trainer 2 + miner 1 on 3 (the trainer's
  steps are the critical path). Between refreshes the worker is idle and the
  trainer takes all C again, so the split holds only while both can be busy.

`--threads` and `--miner-threads` override either share (`--threads` fixes
the trainer's for the whole run). `limit_threads`
applies a share in a process: threadpoolctl's limits on every OpenMP and BLAS
pool loaded so far, and torch's own setting when torch is loaded.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from twotower.process.openmp import limit_pools, threadpools


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per process of one run.

    cores: the cores counted (`usable_cores`); trainer: the trainer's threads;
    miner: the miner's threads (None: not limited; an in-process miner uses the
    trainer's pools); miner_in_worker: whether the miner has its own process;
    rule: why, in words; beside_search: the trainer's threads while its worker
    searches beside it (None: the same as trainer).
    """

    cores: int
    trainer: int
    miner: int | None
    miner_in_worker: bool
    rule: str
    beside_search: int | None = None

    @property
    def trainer_beside_search(self) -> int:
        """The trainer's threads while its worker searches beside it."""
        return self.beside_search or self.trainer

    def as_dict(self) -> dict[str, Any]:
        """The budget as a JSON-ready object (heartbeat, doctor)."""
        return asdict(self)

    def describe(self) -> str:
        """'trainer 2 (1 while the worker searches) + miner worker 1 threads of 2 cores (...)'."""
        trainer = f"trainer {self.trainer}"
        if self.trainer_beside_search != self.trainer:
            trainer += f" ({self.trainer_beside_search} while the worker searches)"
        miner = f" + miner worker {self.miner or self.cores}" if self.miner_in_worker else ""
        plural = "s" * (self.trainer != 1 or self.miner_in_worker)
        return f"{trainer}{miner} thread{plural} of {self.cores} cores ({self.rule})"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform keeps one
    (Linux, Windows; macOS has none), at most the physical cores (as torch counts them:
    a second hyper-thread per core adds little to GEMM), at least 1."""
    logical = psutil.cpu_count(logical=True) or 1
    with contextlib.suppress(AttributeError, psutil.Error):  # macOS keeps no affinity
        logical = len(psutil.Process().cpu_affinity() or []) or logical
    physical = psutil.cpu_count(logical=False) or logical
    return max(1, min(logical, physical))


def thread_budget(
    cores: int,
    threads: int | None = None,
    miner_threads: int | None = None,
    miner_in_worker: bool = False,
    overlapped: bool = False,
) -> ThreadBudget:
    """The budget by the module's rule for `cores` cores; threads / miner_threads: the
    user's explicit shares (None: the rule's). miner_in_worker: the miner has its own
    process; overlapped: it searches while the trainer steps."""
    if not miner_in_worker:
        rule = "the miner searches in the trainer's process"
        return ThreadBudget(cores, threads or cores, miner_threads, False, rule)
    if not overlapped:
        rule = "they take turns: the trainer waits for each search"
        return ThreadBudget(cores, threads or cores, miner_threads or cores, True, rule)
    miner = miner_threads or max(1, cores // 2)
    beside = threads or max(1, cores - miner)
    rule = "mining overlaps training: the cores are split while the worker searches"
    if beside + miner > cores:
        rule += f"; {beside} + {miner} threads oversubscribe {cores} cores"
    return ThreadBudget(cores, threads or cores, miner, True, rule, beside)


def limit_threads(count: int) -> list[dict[str, Any]]:
    """Give this process `count` threads: threadpoolctl's limit on every OpenMP and BLAS
    pool loaded now (load the engines first: a library loaded later keeps its default),
    and torch.set_num_threads when torch is loaded. Returns `openmp.threadpools()` after."""
    limit_pools(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    return threadpools()

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

A step too small to split (under SPLIT_MIN_FLOPS, `training.cost.step_flops`)
runs on 1 thread: its GEMMs are so short that waking a second thread costs more
than it saves (docs/BENCHMARKS.md, "A busy machine": the demo's 0.16 GFLOP step
takes 9-10 ms on 1 thread and 13-15 ms on 2 on a quiet 2-core machine; at 2.8
GFLOP and up 2 threads are 10-20% faster). Evaluation keeps every core.
`ThreadSwitch` applies the count for what the trainer does next.

`--threads` and `--miner-threads` override either share (`--threads` fixes
the trainer's for the whole run, steps included). `limit_threads`
applies a share in a process: threadpoolctl's limits on every OpenMP and BLAS
pool loaded so far, and torch's own setting when torch is loaded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import psutil

from twotower.process.openmp import limit_pools, threadpools

# Below this many FLOPs a training step runs on 1 thread (see the module docstring): the
# crossover measured on a quiet 2-core machine lies between 0.8 and 2.8 GFLOP.
SPLIT_MIN_FLOPS = 1.5e9


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per process of one run.

    cores: the cores counted (`usable_cores`); trainer: the trainer's threads;
    miner: the miner's threads (None: not limited; an in-process miner uses the
    trainer's pools); miner_in_worker: whether the miner has its own process;
    rule: why, in words; beside_search: the trainer's threads while its worker
    searches beside it (None: the same as trainer); step: the trainer's threads for a
    training step (None: the same), with step_rule saying why.
    """

    cores: int
    trainer: int
    miner: int | None
    miner_in_worker: bool
    rule: str
    beside_search: int | None = None
    step: int | None = None
    step_rule: str | None = None

    @property
    def trainer_beside_search(self) -> int:
        """The trainer's threads while its worker searches beside it."""
        return self.beside_search or self.trainer

    def count(self, stepping: bool, searching: bool) -> int:
        """The trainer's threads for a step (stepping) or other work (evaluation), while its
        worker searches beside it (searching) or not."""
        threads = self.trainer_beside_search if searching else self.trainer
        return min(threads, self.step or threads) if stepping else threads

    def as_dict(self) -> dict[str, Any]:
        """The budget as a JSON-ready object (heartbeat, doctor)."""
        return asdict(self)

    def describe(self) -> str:
        """'trainer 2 (1 while the worker searches) + miner worker 1 threads of 2 cores (...)'."""
        trainer = f"trainer {self.trainer}"
        notes = [f"{self.step} for its steps: {self.step_rule}"] if self.step else []
        if self.trainer_beside_search != self.trainer:
            notes.append(f"{self.trainer_beside_search} while the worker searches")
        trainer += f" ({'; '.join(notes)})" if notes else ""
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
    step_flops: float | None = None,
) -> ThreadBudget:
    """The budget by the module's rule for `cores` cores; threads / miner_threads: the
    user's explicit shares (None: the rule's). miner_in_worker: the miner has its own
    process; overlapped: it searches while the trainer steps; step_flops: one training
    step's FLOPs (None: unknown, steps use the trainer's threads)."""
    budget = _shares(cores, threads, miner_threads, miner_in_worker, overlapped)
    if threads is None and cores > 1 and step_flops is not None and step_flops < SPLIT_MIN_FLOPS:
        rule = f"a step of {step_flops / 1e9:.2f} GFLOP is too small to split"
        return replace(budget, step=1, step_rule=rule)
    return budget


def _shares(
    cores: int,
    threads: int | None,
    miner_threads: int | None,
    miner_in_worker: bool,
    overlapped: bool,
) -> ThreadBudget:
    """The trainer's and the miner's shares of `thread_budget`, before its step rule."""
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


class ThreadSwitch:
    """The trainer's thread count for what it does next, applied by `limit_threads` when it
    changes: `budget.count(stepping, searching)`. Both flags follow from the config (steps
    and evaluations, a refresh's take and use steps), never from timing, so a rerun or a
    resumed run computes every step on the same count (torch-cpu's last bits depend on it).

    on_switch(pools) receives `threadpools()` after each change (the heartbeat keeps them).
    Starts as `limit_threads(budget.trainer)` left the process: not stepping, not searching.
    """

    def __init__(self, budget: ThreadBudget, on_switch: Callable[[list[dict[str, Any]]], None]):
        self.budget = budget
        self.on_switch = on_switch
        self.stepping = False
        self.searching = False
        self.threads = budget.trainer

    def to(self, stepping: bool | None = None, searching: bool | None = None) -> int:
        """Set either flag (None: keep it) and apply its count; returns the count."""
        self.stepping = self.stepping if stepping is None else stepping
        self.searching = self.searching if searching is None else searching
        count = self.budget.count(self.stepping, self.searching)
        if count != self.threads:
            self.threads = count
            self.on_switch(limit_threads(count))
        return count


def limit_threads(count: int) -> list[dict[str, Any]]:
    """Give this process `count` threads: threadpoolctl's limit on every OpenMP and BLAS
    pool loaded now (load the engines first: a library loaded later keeps its default),
    and torch.set_num_threads when torch is loaded. Returns `openmp.threadpools()` after."""
    limit_pools(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    return threadpools()

"""Step-time stalls and CPU contention: whether a run is slow because the machine is busy.

Two readings, kept apart so each can be checked on its own:

- `StepTimes`: a run's step durations. The start's median (steps SKIP..SKIP+START, after
  the first ones that load and warm caches), the recent median (the last WINDOW steps),
  and stalls: a step over STALL_FACTOR times the recent median.
- `Contention`: the machine's CPU between two `cpu_sample`s: how many cores processes
  other than this one and its children kept busy (psutil's machine CPU times less the
  process tree's own), beside the load average (runnable threads, 1 min) and the cores.

`StallWatch` is what the trainer holds: each step's duration goes in, a contention
reading is taken every `every` seconds, and when the verdict changes (steps SLOWDOWN
times slower than at the start while other processes crowd the cores, or back to
normal) it returns the line to log: "the machine is oversubscribed: load average 4.0
for 2 cores, other processes kept 1.6 cores busy beside this run's 2 threads; steps
are 9x slower than at the start ...", with what to do. `as_dict` is the heartbeat's
field. `machine_contention` is the doctor's one-off reading.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psutil

from twotower.process import wait_policy
from twotower.process.memory import process_tree

SKIP = 5  # first steps left out of the start's median (loading, warm-up)
START = 20  # steps whose median is "the start"
WINDOW = 50  # recent steps whose median is "now"
STALL_FACTOR = 5.0  # a step this many times the recent median is a stall
SLOWDOWN = 2.0  # recent median / the start's at which a busy machine is named
CROWDED = 0.5  # cores other processes must keep busy to count as competing
IDLE_FIELDS = ("idle", "iowait")  # machine CPU time that is not work


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: the machine's busy time (every core) and that
    of this process and its children (`own`), at wall time `wall` (time.monotonic)."""

    wall: float
    machine_busy: float
    own: float


def cpu_sample(pid: int | None = None) -> CpuSample:
    """The machine's busy CPU seconds and those of process `pid` (None: this one) with every
    process it started (a miner worker), now."""
    times = psutil.cpu_times()
    busy = sum(times) - sum(getattr(times, name, 0.0) for name in IDLE_FIELDS)
    own = 0.0
    for one in process_tree(pid or os.getpid()):
        try:
            used = psutil.Process(one).cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        own += used.user + used.system
    return CpuSample(time.monotonic(), busy, own)


def load_average() -> float | None:
    """The 1-minute load average (runnable threads; psutil emulates it on Windows)."""
    try:
        return float(psutil.getloadavg()[0])
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class Contention:
    """The machine between two samples: cores; others: cores that other processes kept busy
    on average; own: cores this process tree used; threads: this run's threads;
    load: the 1-minute load average (None where unknown)."""

    cores: int
    others: float
    own: float
    threads: int
    load: float | None

    @property
    def crowded(self) -> bool:
        """Other processes compete for the cores this run's threads want."""
        return self.others >= CROWDED and self.others + self.threads > self.cores

    def describe(self) -> str:
        """'load average 4.0 for 2 cores, other processes kept 1.6 cores busy beside this
        run's 2 threads'."""
        load = f"load average {self.load:.1f} for " if self.load is not None else ""
        return (
            f"{load}{self.cores} cores, other processes kept {self.others:.1f} cores busy "
            f"beside this run's {self.threads} thread{'s' * (self.threads != 1)}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The reading as JSON-ready fields (heartbeat, doctor --json)."""
        return {
            "cores": self.cores,
            "others_cores": round(self.others, 2),
            "own_cores": round(self.own, 2),
            "threads": self.threads,
            "load_average": None if self.load is None else round(self.load, 2),
            "crowded": self.crowded,
        }


def what_to_do(threads: int) -> str:
    """The advice for an oversubscribed machine, by this process's OpenMP wait policy and
    thread count."""
    chosen = wait_policy.user_choice(os.environ)
    if chosen and chosen.get(wait_policy.POLICY_VARIABLE, "").upper() != "PASSIVE":
        settings = ", ".join(f"{name}={value}" for name, value in chosen.items())
        return (
            f"your {settings} keeps waiting OpenMP threads spinning, which a busy machine "
            f"turns into stalls: unset it (twotower's default is OMP_WAIT_POLICY=PASSIVE)"
        )
    if not os.environ.get(wait_policy.SET_BY_TWOTOWER) and not chosen:
        return (
            "set OMP_WAIT_POLICY=PASSIVE before torch is imported (waiting OpenMP threads "
            "spin here), or run with --threads 1"
        )
    if threads > 1:
        return "if it lasts, run with --threads 1 (one thread has no partner to wait for)"
    return "stop the other work or run when the machine is free"


def contention_between(before: CpuSample, after: CpuSample, cores: int, threads: int) -> Contention:
    """The machine between two samples of the same process tree."""
    wall = max(after.wall - before.wall, 1e-9)
    own = max(0.0, after.own - before.own) / wall
    machine = max(0.0, after.machine_busy - before.machine_busy) / wall
    return Contention(cores, max(0.0, machine - own), own, threads, load_average())


def machine_contention(cores: int, seconds: float = 1.0, threads: int = 0) -> Contention:
    """A reading over the next `seconds` (this process sleeps meanwhile): the doctor's."""
    before = cpu_sample()
    time.sleep(seconds)
    return contention_between(before, cpu_sample(), cores, threads)


class StepTimes:
    """A run's step durations (seconds): the start's median, the recent one, stalls."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[float] = []  # steps SKIP..SKIP+START
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.stalls = 0

    def add(self, seconds: float) -> bool:
        """Record one step; True when it is a stall (over STALL_FACTOR x the recent median)."""
        self.count += 1
        stall = len(self.recent) >= START and seconds > STALL_FACTOR * self.recent_median()
        self.stalls += stall
        if SKIP < self.count <= SKIP + START:
            self.first.append(seconds)
        self.recent.append(seconds)
        return stall

    def start_median(self) -> float | None:
        """The median of the start's steps (None until they have run)."""
        return statistics.median(self.first) if len(self.first) == START else None

    def recent_median(self) -> float:
        """The median of the last WINDOW steps (0 before any)."""
        return statistics.median(self.recent) if self.recent else 0.0

    def slowdown(self) -> float | None:
        """The recent median over the start's (None until both are known)."""
        start = self.start_median()
        return self.recent_median() / start if start else None


class StallWatch:
    """The trainer's view of its own slowness: `step(seconds)` after each step returns a line
    to log when the verdict changes (see the module docstring), else None.

    cores: the cores this process may use; threads: the trainer's threads; every: seconds
    between contention readings; advice: what to do, appended to an oversubscribed verdict.
    """

    def __init__(self, cores: int, threads: int, every: float = 5.0, advice: str = ""):
        self.cores, self.threads, self.every, self.advice = cores, threads, every, advice
        self.times = StepTimes()
        self.contention: Contention | None = None
        self.oversubscribed = False
        self._sample = cpu_sample()

    def step(self, seconds: float) -> str | None:
        """Record a step of `seconds`; the line to log when the verdict changes."""
        self.times.add(seconds)
        now = time.monotonic()
        if now - self._sample.wall < self.every:
            return None
        after = cpu_sample()
        self.contention = contention_between(self._sample, after, self.cores, self.threads)
        self._sample = after
        slowdown = self.times.slowdown()
        if slowdown is None:
            return None
        verdict = self.contention.crowded and slowdown >= SLOWDOWN
        if verdict == self.oversubscribed:
            return None
        self.oversubscribed = verdict
        return self.describe()

    def describe(self) -> str:
        """The verdict in words (oversubscribed, with what to do; or steps as at the start)."""
        slowdown, start = self.times.slowdown(), self.times.start_median()
        if slowdown is None or start is None or self.contention is None:
            return "step times: not measured yet"
        pace = (
            f"steps take {slowdown:.1f}x their time at the start (median "
            f"{1e3 * self.times.recent_median():.0f} ms vs {1e3 * start:.0f} ms; "
            f"{self.times.stalls} stalls over {STALL_FACTOR:g}x the recent median)"
        )
        if self.oversubscribed:
            advice = f"; {self.advice}" if self.advice else ""
            return f"the machine is oversubscribed: {self.contention.describe()}; {pace}{advice}"
        return f"the machine is no longer oversubscribed: {self.contention.describe()}; {pace}"

    def as_dict(self) -> dict[str, Any]:
        """The heartbeat's `contention` field: the last reading, the step times, the verdict."""
        slowdown = self.times.slowdown()
        return {
            **(self.contention.as_dict() if self.contention else {}),
            "slowdown": None if slowdown is None else round(slowdown, 2),
            "stalls": self.times.stalls,
            "oversubscribed": self.oversubscribed,
            **({"message": self.describe()} if self.oversubscribed else {}),
        }

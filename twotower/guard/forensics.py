"""Crash forensics: what a child leaves behind, what its death means, and the report.

Shared by `twotower train` (the supervisor) and `twotower watch`:

- the child's side of the contract lives in `twotower.process.crash_dump`, which the
  trainer imports without reaching up into guard/;
- `ChildOutcome`: how a child ended and what was seen while it ran (the
  evidence itself comes from `twotower.guard.evidence`);
- judgement: `likely_causes` (each cause with its confidence, evidence and a
  mitigation) and `examine`, which turns an outcome into the JSON report
  written to `crashes/`, with `summary_lines` for the human summary on stderr.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower.atomic import replace_file
from twotower.guard import native_report
from twotower.guard.evidence import (
    MemoryTrend,
    kernel_log,
    memory_limit_kb,
    python_traceback,
    size_text,
    tail,
)
from twotower.process.exit_status import ExitStatus
from twotower.process.faults import Fault
from twotower.process.phase import MINER_PHASES, Phase
from twotower.run.records import Beat

NEAR_LIMIT = 0.8  # peak RSS at or above this share of the memory limit counts as "near"
NATIVE_CRASHES = ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE")
INJECTED_EXITS = {"segv": "SIGSEGV", "abort": "SIGABRT", "kill": "SIGKILL"}
OOM_LINE = re.compile(r"oom|[Kk]illed process")
MINER_DOING: dict[str, str] = {
    Phase.BUILD_INDEX: "building its index",
    Phase.LOAD_INDEX: "loading its index",
}

# --- what happened and why --------------------------------------------------------------


@dataclass
class ChildOutcome:
    """How one child process ended and what was seen of it while it ran.

    peak_rss_kb: getrusage's figure for the child (on Linux at least the size of
    the process that started it). heartbeat: its last heartbeat (twotower
    children only). openmp: the OpenMP runtimes seen loaded in it, None where
    that cannot be known (another process on macOS). stacks: the
    faulthandler output it left (crash file, or its stderr). watchdog: set when
    the watchdog killed it for a stall. interrupted: the signal name, when this
    side forwarded SIGINT/SIGTERM to it. oom_kills: the cgroup's OOM-kill
    counter's growth while it ran (None where unreadable). role: which process of
    the run it was ("trainer", "miner worker"). native: the report's "native" section: every
    thread's native frames from a core, an attached gdb or a macOS crash report, or the note
    saying why there are none.
    """

    command: list[str]
    pid: int
    exit: ExitStatus
    started: float
    seconds: float
    peak_rss_kb: int | None = None
    memory: MemoryTrend = field(default_factory=MemoryTrend)
    heartbeat: Beat | None = None
    openmp: list[str] | None = None
    stacks: str | None = None
    stderr_tail: str = ""
    watchdog: dict[str, Any] | None = None
    interrupted: str | None = None
    oom_kills: int | None = None
    role: str = "trainer"  # or "miner worker"
    native: dict[str, Any] | None = None  # native frames (guard.native), None: no native crash

    @property
    def crashed(self) -> bool:
        """True unless it exited 0 or was interrupted on request."""
        return self.exit.returncode != 0 and self.interrupted is None


@dataclass
class Cause:
    """One explanation: 'certain' (e.g. an injected fault), 'likely' or 'possible'."""

    confidence: str
    cause: str
    evidence: list[str]
    mitigation: str


def _injected(outcome: ChildOutcome, armed: Sequence[Fault]) -> Fault | None:
    """The armed fault that explains this death: same phase and step, matching kind and engine."""
    beat = outcome.heartbeat
    if not beat:
        return None
    engines = {beat.backend, beat.miner}
    for fault in armed:
        if (fault.phase, fault.step) != (beat.phase, beat.step):
            continue
        if fault.engine is not None and fault.engine not in engines:
            continue
        died_so = (
            (fault.kind == "hang" and outcome.watchdog is not None)
            or (fault.kind == "raise" and outcome.exit.code == 1)
            or INJECTED_EXITS.get(fault.kind) == outcome.exit.signal
        )
        if died_so:
            return fault
    return None


def likely_causes(
    outcome: ChildOutcome, evidence: dict[str, Any], armed: Sequence[Fault] = ()
) -> list[Cause]:
    """The causes that fit, most certain first.

    evidence: {"limit_kb", "limit_source", "kernel_log"} as `examine` gathers them.
    armed: the faults of TWOTOWER_INJECT_FAULT, so a rehearsal is named as one.
    """
    causes: list[Cause] = []
    fault = _injected(outcome, armed)
    if fault is not None:
        causes.append(
            Cause(
                "certain",
                f"injected fault {fault.label}",
                [f"TWOTOWER_INJECT_FAULT arms {fault.label}; it died at that point"],
                "none needed: this rehearses a crash (unset TWOTOWER_INJECT_FAULT to stop it)",
            )
        )
    beat = outcome.heartbeat
    phase, backend, miner = (beat.phase, beat.backend, beat.miner) if beat else (None,) * 3
    sig = outcome.exit.signal
    kernel = evidence.get("kernel_log") or []
    if outcome.watchdog is not None:
        causes.append(_hang_cause(outcome))
    elif sig == "SIGKILL":
        causes.append(_memory_cause(outcome, evidence))
    elif sig in NATIVE_CRASHES:
        causes.extend(_native_causes(outcome, phase, backend, miner, kernel, fault is not None))
    elif outcome.exit.code == 1 and python_traceback(outcome.stderr_tail):
        last = python_traceback(outcome.stderr_tail).splitlines()[-1]  # type: ignore[union-attr]
        causes.append(
            Cause(
                "certain",
                f"a Python exception: {last}",
                ["the traceback on its stderr"],
                "read the traceback; a restart helps only if the error does not recur",
            )
        )
    if not causes:
        causes.append(
            Cause("possible", outcome.exit.describe(), [], "see the stderr tail in the report")
        )
    return causes


def _hang_cause(outcome: ChildOutcome) -> Cause:
    dog = outcome.watchdog or {}
    return Cause(
        "likely",
        f"a hang: no heartbeat for {dog.get('silent_s')} s (limit {dog.get('timeout')} s)",
        ["the watchdog asked for every thread's stack (SIGUSR1), then sent SIGKILL"]
        + (["the stacks are in this report"] if outcome.stacks else []),
        "the stacks show where it waited: a wait inside OpenMP or BLAS (faiss, torch) points "
        "at two OpenMP runtimes, keep --miner-isolation process; if the phase is only slow, "
        "raise --hang-timeout",
    )


def _memory_cause(outcome: ChildOutcome, evidence: dict[str, Any]) -> Cause:
    sampled = outcome.memory.peak[2] if outcome.memory.peak else None
    peak = max((kb for kb in (outcome.peak_rss_kb, sampled) if kb), default=None)
    limit = evidence.get("limit_kb")
    found = []
    near = False
    if peak and limit:
        share = peak / limit
        near = share >= NEAR_LIMIT
        found.append(
            f"peak RSS {size_text(peak)} is {share:.0%} of {size_text(limit)} "
            f"({evidence['limit_source']})"
        )
    if outcome.oom_kills:
        found.append(f"the cgroup's oom_kill counter grew by {outcome.oom_kills} while it ran")
    kernel = [line for line in evidence.get("kernel_log") or [] if OOM_LINE.search(line)]
    found.extend(kernel)
    if evidence.get("kernel_log") is None and sys.platform.startswith("linux"):
        found.append("dmesg is not readable here; `sudo dmesg | grep -i oom` may say more")
    if sys.platform == "darwin":
        where = (
            "macOS jetsam kills without a trace in the process: look in "
            "/Library/Logs/DiagnosticReports/JetsamEvent-*.ips and run "
            "`log show --last 1h --predicate 'eventMessage contains \"jetsam\"'`"
        )
    else:
        where = "`dmesg | grep -i -e oom -e 'killed process'` shows the OOM killer's choice"
    likely = near or bool(outcome.oom_kills) or bool(kernel)
    return Cause(
        "likely" if likely else "possible",
        "memory pressure: the OOM killer or jetsam ended it"
        if likely
        else "killed from outside (memory pressure, kill -9, a job scheduler)",
        found,
        f"{where}; lower --queue-size or --batch-size, keep the data memory-mapped "
        "(a directory, or `twotower convert` for a .npz), close other memory users",
    )


def _openmp_clash(outcome: ChildOutcome, where: list[str]) -> Cause | None:
    """Two OpenMP runtimes in the process (or OpenMP's own error #15 on stderr), else None."""
    omp_error = "OMP: Error #15" in outcome.stderr_tail
    runtimes = outcome.openmp or []
    if len(runtimes) < 2 and not omp_error:
        return None
    return Cause(
        "likely",
        "two OpenMP runtimes in one process: the faiss/torch clash "
        "(faiss issue 4273, pytorch issue 149201)",
        [f"{len(runtimes)} OpenMP runtimes loaded: {', '.join(runtimes)}"]
        + (["stderr: OMP: Error #15"] if omp_error else [])
        + where,
        "--miner-isolation process (the default for faiss and hnswlib) keeps the "
        "miner's OpenMP out of the trainer; otherwise load one OpenMP only "
        "(KMP_DUPLICATE_LIB_OK=TRUE silences the check, not the clash)",
    )


def _native_causes(
    outcome: ChildOutcome,
    phase: str | None,
    backend: str | None,
    miner: str | None,
    kernel: list[str],
    explained: bool,
) -> list[Cause]:
    """Native-crash causes that fit; a generic one only when nothing (not even an injected
    fault, `explained`) accounts for it."""
    causes = []
    where = [f"{outcome.exit.signal} in phase {phase}"] if phase else []
    clash = _openmp_clash(outcome, where)
    if clash is not None:
        causes.append(clash)
    if phase in MINER_PHASES and outcome.role == "trainer":
        doing = MINER_DOING.get(phase, "searching")
        causes.append(
            Cause(
                "likely",
                f"the miner's native library ({miner}) crashed while {doing} in-process",
                where + kernel,
                "--miner-isolation process: a crash then costs a worker restart, not the "
                "trainer; --miner-fallback names the miners to switch to",
            )
        )
    elif outcome.role != "trainer":
        causes.append(
            Cause(
                "likely",
                f"the miner's native library ({miner}) crashed in its worker process",
                where + kernel,
                "nothing, if it was rare: the isolated worker is restarted once, then "
                "--miner-fallback takes over, and no step is lost; if it recurs, "
                "`twotower doctor` checks known-bad faiss/hnswlib versions",
            )
        )
    if backend == "torch-mps" and phase in (Phase.STEP, Phase.ENCODE):
        causes.append(
            Cause(
                "likely",
                "an MPS kernel bug: packed-sequence GRU paths crash on torch-mps",
                where + kernel,
                "--gru-path masked, or --backend torch-cpu",
            )
        )
    if outcome.exit.signal == "SIGILL":
        causes.append(
            Cause(
                "likely",
                "a wheel built for another CPU (x86 under Rosetta, AVX-512 on an older CPU)",
                where + kernel,
                "reinstall torch/faiss/numpy wheels built for this machine",
            )
        )
    if not causes and not explained:
        engine = miner if phase in MINER_PHASES else backend
        causes.append(
            Cause(
                "possible",
                f"a native crash in {engine or 'the process'}"
                + (f" during {phase}" if phase else ""),
                where + kernel,
                "if it recurs at the same point, suspect that engine: `twotower doctor` checks "
                "known-bad versions and OpenMP runtimes, `twotower replay --run RUN --step N` "
                "compares the engines on that step; under `twotower train` the supervisor "
                "restarts from the last checkpoint and switches engine",
            )
        )
    return causes


# --- the report -------------------------------------------------------------------------


def examine(
    outcome: ChildOutcome, label: str, armed: Sequence[Fault] = (), **extra: Any
) -> dict[str, Any]:
    """The crash report of `outcome` as a JSON-ready dict: exit, where (heartbeat), memory,
    OpenMP runtimes, the thread pools and thread budget the trainer recorded (threadpoolctl,
    in its heartbeat), stacks, traceback, stderr tail, causes; `extra` is added as is."""
    limit_kb, limit_source = memory_limit_kb()
    evidence = {
        "limit_kb": limit_kb,
        "limit_source": limit_source,
        "kernel_log": kernel_log(outcome.pid),
    }
    causes = likely_causes(outcome, evidence, armed)
    beat = outcome.heartbeat
    where = None
    if beat:
        ended = outcome.started + outcome.seconds
        where = {
            "phase": beat.phase,
            "step": beat.step,
            "backend": beat.backend,
            "miner": beat.miner,
            "heartbeat_age_s": round(max(0.0, ended - (beat.time or ended)), 2),
        }
    report = {
        "label": label,
        "pid": outcome.pid,
        "command": outcome.command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(outcome.started)),
        "seconds": round(outcome.seconds, 2),
        "exit": {
            "returncode": outcome.exit.returncode,
            "signal": outcome.exit.signal,
            "code": outcome.exit.code,
            "description": (
                "killed by SIGKILL from the watchdog (no heartbeat)"
                if outcome.watchdog and outcome.exit.signal == "SIGKILL"
                else outcome.exit.describe()
            ),
        },
        "where": where,
        "watchdog": outcome.watchdog,
        "memory": {
            "peak_rss_kb": outcome.peak_rss_kb,
            "limit_kb": limit_kb,
            "limit_source": limit_source,
            "oom_kills": outcome.oom_kills,
            **outcome.memory.as_dict(),
        },
        "openmp": outcome.openmp,
        "threadpools": beat.extra.get("threadpools") if beat else None,
        "threads": beat.extra.get("threads") if beat else None,
        "stacks": outcome.stacks,
        "native": outcome.native,
        "python_traceback": python_traceback(outcome.stderr_tail),
        "kernel_log": evidence["kernel_log"],
        "stderr_tail": tail(outcome.stderr_tail),
        "causes": [cause.__dict__ for cause in causes],
        **extra,
    }
    report["causes"] += native_report.known_causes(report)
    return report


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write `report` as JSON to `path` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(report, indent=2, default=str))
    return path


def crashing_thread_first(stacks: str) -> list[str]:
    """faulthandler output as lines: its header, the thread that crashed (or took the
    watchdog's signal), then the other threads; the list of extension modules left out."""
    blocks = [block.strip() for block in stacks.strip().split("\n\n") if block.strip()]
    header = [b for b in blocks if not b.startswith(("Thread ", "Current thread ", "Extension"))]
    current = [b for b in blocks if b.startswith("Current thread ")]
    others = [b for b in blocks if b.startswith("Thread ")]
    return "\n".join(header + current + others).splitlines()


def summary_lines(report: dict[str, Any], stack_lines: int = 12) -> list[str]:
    """The human summary of a report: what died, where, memory, OpenMP, stacks, causes."""
    where = report.get("where")
    place = (
        f"in phase {where['phase']} at step {where['step']}"
        if where
        else "with no heartbeat to say where (start-up, or not a twotower trainer)"
    )
    lines = [f"{report['label']} (pid {report['pid']}) {report['exit']['description']} {place}"]
    if where:
        engines = [f"{role} {where[role]}" for role in ("backend", "miner") if where.get(role)]
        lines.append(f"  engines: {', '.join(engines)}")
    memory = report["memory"]
    peak = memory.get("peak_rss_kb") or memory.get("peak_sampled_kb")
    limit = memory.get("limit_kb")
    lines.append(
        f"  memory: peak RSS {size_text(peak) if peak else 'unknown'}"
        + (f" of {size_text(limit)} ({memory['limit_source']})" if limit else "")
        + f"; {memory['trend']}"
    )
    runtimes = report.get("openmp")
    if runtimes is None:
        lines.append("  OpenMP runtimes loaded: unknown (ended before a sample, or unreadable)")
    else:
        lines.append(f"  OpenMP runtimes loaded: {len(runtimes)}")
        lines.extend(f"    {path}" for path in runtimes)
    if report.get("watchdog"):
        dog = report["watchdog"]
        lines.append(f"  watchdog: no heartbeat for {dog['silent_s']} s (limit {dog['timeout']} s)")
    if report.get("stacks"):  # faulthandler: most recent call first
        stacks = crashing_thread_first(report["stacks"])
        lines.append("  stacks (faulthandler, most recent call first):")
        lines.extend(f"    {line.strip()}" for line in stacks[:stack_lines])
        if len(stacks) > stack_lines:
            lines.append(f"    ... ({len(stacks) - stack_lines} more lines in the report)")
    elif report.get("python_traceback"):  # most recent call last
        lines.append("  traceback (last lines):")
        traceback = report["python_traceback"].splitlines()
        lines.extend(f"    {line}" for line in traceback[-stack_lines:])
    lines.extend(native_report.native_summary(report.get("native")))
    for cause in report["causes"]:
        lines.append(f"  {cause['confidence']} cause: {cause['cause']}")
        lines.extend(f"    evidence: {item}" for item in cause["evidence"])
        lines.append(f"    what to do: {cause['mitigation']}")
    return lines

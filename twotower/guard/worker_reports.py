"""Crash reports for miner workers: a worker's death gets the report a trainer's gets.

The trainer learns of the death through its miner chain (`MinerCrashed.evidence`,
gathered by `miners.worker_death`) but may not import guard/; so `train` here, which
is `twotower.train`, hands `report_worker_death` down to it as a hook. The report is
`forensics.examine`'s, marked `"process": "miner worker"`, in RUN/crashes/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twotower.config import TrainConfig
from twotower.guard import forensics
from twotower.process import faults, wait_policy
from twotower.process.exit_status import ExitStatus
from twotower.run.records import Beat
from twotower.training.trainer import RunResult
from twotower.training.trainer import train as train_without_reports


def report_name(evidence: dict[str, Any]) -> str:
    """'miner-faiss-step-0000010-pid123.json' for a worker's death."""
    step = evidence.get("step") or 0
    return f"miner-{evidence['miner']}-step-{int(step):07d}-pid{evidence['pid']}.json"


def report_worker_death(crashes: Path, event: dict[str, Any]) -> Path:
    """Write the crash report of a dead miner worker into `crashes`; return its path.

    event: the miner chain's crash event ({"miner", "step", "how", "next", "worker":
    evidence}). Also prints the report's summary on stderr, like the supervisor does.
    """
    evidence = event["worker"]
    started, seconds = float(evidence["started"]), float(evidence["seconds"])
    returncode = evidence.get("returncode")
    outcome = forensics.ChildOutcome(
        command=list(evidence.get("command") or []),
        pid=int(evidence["pid"]),
        exit=ExitStatus(int(returncode) if returncode is not None else -9),
        started=started,
        seconds=seconds,
        peak_rss_kb=evidence.get("peak_rss_kb"),
        heartbeat=Beat(
            pid=int(evidence["pid"]),
            step=evidence.get("step"),
            phase=evidence.get("phase") or "start-up",
            miner=evidence["miner"],
            time=started + seconds,
        ),
        openmp=evidence.get("openmp"),
        stacks=evidence.get("stacks"),
        watchdog=evidence.get("watchdog"),
        role=evidence.get("process", "miner worker"),
        native=evidence.get("native"),
    )
    armed = faults.parse_faults(os.environ.get(faults.ENV_VAR))
    label = f"{outcome.role} ({evidence['miner']})"
    report = forensics.examine(
        outcome, label, armed, process=outcome.role, miner=evidence["miner"], next=event["next"]
    )
    path = forensics.write_report(crashes / report_name(evidence), report)
    summary = [*forensics.summary_lines(report), f"  report: {path}", f"  next: {event['next']}"]
    print("twotower: " + "\n".join(summary), file=sys.stderr, flush=True)
    return path


def train(config: TrainConfig) -> RunResult:
    """Train in this process (`twotower.train`); a miner worker's death leaves a crash report
    in RUN/crashes/. Raises UsageError for bad input before anything is written.

    Sets twotower's OpenMP wait policy first, where torch and faiss have not loaded yet."""
    wait_policy.apply()
    return train_without_reports(config, on_worker_death=report_worker_death)

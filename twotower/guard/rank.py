"""Under torchrun: one rank's guard. torchrun's agent restarts, twotower reports.

`torchrun --nproc-per-node W -m twotower train ...` starts W of these guards.
Each runs its rank's trainer in a watched child (`monitor.WatchedChild`, with
the torchrun environment passed through, so the child joins the process
group): faulthandler writes to `crashes/rankR-attempt-A.stacks.txt`, the
rank's heartbeat is followed (and, with --hang-timeout, watched). When the
child dies abnormally the guard writes `crashes/rankR-attempt-A.json`, the
supervisor's report plus `rank` and `world_size`, with the phase and step
from the heartbeat, prints the summary and exits as the child did (128 + N
for signal N). torchrun's agent then stops the other ranks and, within its
`--max-restarts`, starts a new group, which resumes from the newest
checkpoint (A = torchrun's restart count + 1).

A rank that fails because another never came to a collective (the group's
timeout, or a peer's broken connection) would otherwise only report its own
error: the report adds every rank's collective ledger it can read
(`twotower.process.collective_ledger`) and, first among its causes, the ranks that
never reached the collective this one waited in, with their heartbeats.

Division of work: torchrun restarts (the group, from the newest checkpoint);
twotower reports and commits checkpoints. The guard neither restarts nor
switches engines: every rank must run the same engine. A guard writes only its
crash report and stacks (named by rank); the trainer's rank 0 writes the rest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from twotower.config import TrainConfig
from twotower.errors import EXIT_USAGE
from twotower.guard import forensics
from twotower.guard.monitor import SignalForwarder, WatchedChild
from twotower.guard.supervisor import trainer_env
from twotower.process import faults
from twotower.process.collective_ledger import LedgerEntry, laggards, ledger_path, read_ledger
from twotower.run.heartbeat import read_beat
from twotower.run.records import Beat
from twotower.run.rundir import RunDir
from twotower.run.settings import write_settings
from twotower.training.ranks.distributed import World, check_config

NEXT_STEP = "torchrun restarts the group from the newest checkpoint, within its --max-restarts"


def guard_rank(config: TrainConfig, world: World) -> int:
    """Run this rank's trainer in a watched child; report an abnormal end. Returns the
    child's exit code as a shell reports it (128 + N for signal N)."""
    assert config.out is not None  # TrainConfig resolves it
    check_config(config, world)
    run_dir = RunDir(config.out)
    run_dir.crashes.mkdir(parents=True, exist_ok=True)
    stem = f"rank{world.rank}-attempt-{world.restart + 1}"
    stack_file = run_dir.crashes / f"{stem}.stacks.txt"
    trainer = dataclasses.replace(config, supervise=False)
    with tempfile.TemporaryDirectory(prefix="twotower-rank-") as folder:
        config_file = write_settings(folder, trainer)
        command = [sys.executable, "-m", "twotower", "train", "--config", str(config_file)]
        with SignalForwarder() as signals:
            outcome = WatchedChild(
                [*command, "--no-supervise"],
                trainer_env(stack_file),
                signals,
                heartbeat=world.heartbeat_path(run_dir.root),
                hang_timeout=config.hang_timeout,
                stack_file=stack_file,
                keep_core=config.keep_core or None,
            ).run()
    if outcome.crashed and outcome.exit.returncode != EXIT_USAGE:
        armed = faults.parse_faults(os.environ.get(faults.ENV_VAR)) if world.arms_faults() else []
        label = f"rank {world.rank} of {world.size}, attempt {world.restart + 1}"
        report = forensics.examine(
            outcome, label, armed, next=NEXT_STEP, rank=world.rank, world_size=world.size
        )
        ledgers = read_ledgers(run_dir.root, world)
        report["collectives"] = {str(rank): entry.as_dict() for rank, entry in ledgers.items()}
        peers = peer_cause(run_dir.root, world, ledgers)
        if peers is not None:
            report["causes"].insert(0, peers.__dict__)
        path = forensics.write_report(run_dir.crashes / f"{stem}.json", report)
        lines = [*forensics.summary_lines(report), f"  report: {path}", f"  next: {NEXT_STEP}"]
        print(f"twotower[rank {world.rank}]: " + "\n".join(lines), file=sys.stderr, flush=True)
    return outcome.exit.shell_code()


def read_ledgers(run_dir: Path, world: World) -> dict[int, LedgerEntry]:
    """Every rank's collective ledger this machine can read, by rank."""
    found = {rank: read_ledger(ledger_path(run_dir, rank)) for rank in range(world.size)}
    return {rank: entry for rank, entry in found.items() if entry is not None}


def peer_cause(
    run_dir: Path, world: World, ledgers: dict[int, LedgerEntry]
) -> forensics.Cause | None:
    """'rank 1 never reached collective #12 ...' when this rank was waiting in a collective
    that other ranks never entered (their ledgers and heartbeats as evidence); else None."""
    behind = laggards(ledgers, world.rank)
    if not behind:
        return None
    mine = ledgers[world.rank]
    names = ", ".join(f"rank {rank}" for rank in behind)
    evidence = [f"rank {world.rank}: {mine.describe()}"]
    for rank in behind:
        beat = read_beat(dataclasses.replace(world, rank=rank).heartbeat_path(run_dir))
        evidence.append(f"rank {rank}: {ledgers[rank].describe()}; {heartbeat_text(beat)}")
    return forensics.Cause(
        "likely",
        f"{names} never reached collective #{mine.entered} ({mine.kind} at step {mine.step}) "
        f"that rank {world.rank} was waiting in: this rank failed waiting for it (the group's "
        "--collective-timeout, or its broken connection), not on its own",
        evidence,
        f"read {names}'s own report and stacks in crashes/ (rank{behind[0]}-attempt-"
        f"{world.restart + 1}.*); a rank stuck without dying leaves none: run with "
        "--hang-timeout so its guard dumps its stacks",
    )


def heartbeat_text(beat: Beat | None) -> str:
    """'its heartbeat: phase step at step 6, 35.2 s old' (or that it has none)."""
    if beat is None:
        return "no heartbeat"
    age = max(0.0, time.time() - beat.time)
    return f"its heartbeat: phase {beat.phase} at step {beat.step}, {age:.1f} s old"

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
from pathlib import Path

from twotower import faults
from twotower.config import TrainConfig
from twotower.errors import EXIT_USAGE
from twotower.guard import forensics
from twotower.guard.monitor import SignalForwarder, WatchedChild
from twotower.guard.supervisor import trainer_env
from twotower.training.distributed import World, check_config
from twotower.training.rundir import RunDir

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
        config_file = Path(folder) / "config.json"
        config_file.write_text(trainer.to_json())
        command = [sys.executable, "-m", "twotower", "train", "--config", str(config_file)]
        with SignalForwarder() as signals:
            outcome = WatchedChild(
                [*command, "--no-supervise"],
                trainer_env(stack_file),
                signals,
                heartbeat=world.heartbeat_path(run_dir.root),
                hang_timeout=config.hang_timeout,
                stack_file=stack_file,
            ).run()
    if outcome.crashed and outcome.exit.returncode != EXIT_USAGE:
        armed = faults.parse_faults(os.environ.get(faults.ENV_VAR)) if world.arms_faults() else []
        label = f"rank {world.rank} of {world.size}, attempt {world.restart + 1}"
        report = forensics.examine(
            outcome, label, armed, next=NEXT_STEP, rank=world.rank, world_size=world.size
        )
        path = forensics.write_report(run_dir.crashes / f"{stem}.json", report)
        lines = [*forensics.summary_lines(report), f"  report: {path}", f"  next: {NEXT_STEP}"]
        print(f"twotower[rank {world.rank}]: " + "\n".join(lines), file=sys.stderr, flush=True)
    return outcome.exit.shell_code()

"""The first half of a run's set-up: everything that can be refused, checked before anything
is written, and every setting the data, the bank or the launch resolves.

`accept(config)` runs named steps, each taking what it needs and returning one object; the
order is what each takes. A step that resolves a setting returns a new copy of the config
(`TrainConfig` is frozen) with the line saying what it resolved and why (`config.Resolved`);
`Accepted.resolutions` keeps those lines for the log, which opens only once the run directory
is accepted. The config `Accepted` holds is the one config.json gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twotower import backends, miners
from twotower.backends import Backend
from twotower.config import TrainConfig
from twotower.data import Dataset, load_dataset
from twotower.errors import UsageError
from twotower.process.collective_ledger import CollectiveLedger, ledger_path
from twotower.process.crash_dump import die_with_parent, enable_crash_dumps
from twotower.process.threads import ThreadBudget, thread_budget, usable_cores
from twotower.run.rundir import MetricsLog, RunDir
from twotower.run.settings import read_settings
from twotower.training.cost import step_flops
from twotower.training.demo import demo_dataset
from twotower.training.evaluation.heldout import HeldOut, held_out
from twotower.training.negatives.bank_choice import resolve as resolve_bank_negatives
from twotower.training.negatives.miner_setup import MinerSetup, resolve_miner
from twotower.training.negatives.refresher import mines_beside_training
from twotower.training.phase_points import supervisor_pid
from twotower.training.ranks.distributed import Group, World, check_config, launched_world
from twotower.training.ranks.solo import RunGroup, Solo
from twotower.training.resolved import Resolved, resolved_copy
from twotower.training.resume import check_run_dir
from twotower.training.tensorboard import summary_writer_class

log = logging.getLogger("twotower")

# (RUN/crashes, the miner chain's crash event with the worker's evidence) -> the report written
WorkerDeathReporter = Callable[[Path, dict[str, Any]], Path]


class MinerEvents:
    """The mining chain's events: logged, and once the run directory is accepted (`metrics`
    set) recorded in metrics.jsonl, a dead worker's with its crash report."""

    def __init__(self, run: RunDir, on_worker_death: WorkerDeathReporter | None):
        self.run = run
        self.on_worker_death = on_worker_death
        self.metrics: MetricsLog | None = None  # None: before the run directory is accepted

    def __call__(self, event: dict[str, Any]) -> None:
        """Log a miner chain event; a worker's death also gets its crash report."""
        fields = {k: v for k, v in event.items() if k not in ("event", "worker")}
        if self.metrics is None:
            log.warning("miner: %s", ", ".join(f"{k}={v}" for k, v in fields.items()))
            return
        if event.get("worker") and self.on_worker_death is not None:
            report = self.on_worker_death(self.run.crashes, event)
            fields["report"] = str(report.relative_to(self.run.root))
        self.metrics.write(f"miner-{event.get('event', 'event')}", **fields)
        log.warning("miner: %s", ", ".join(f"{k}={v}" for k, v in fields.items()))


@dataclass
class Accepted:
    """A run's input checked, nothing written yet: the config as the launch, the data and the
    bank resolve it, the run directory and its stored config (None: none), the processes,
    dataset, engine, held-out split, miners (made and checked, not built), the miner chain's
    event sink, the thread budget, and the resolvers' lines (what changed and why) to log."""

    config: TrainConfig
    run: RunDir
    stored: dict[str, Any] | None
    group: RunGroup
    dataset: Dataset
    backend: Backend
    split: HeldOut
    miners: MinerSetup
    events: MinerEvents
    threads: ThreadBudget
    resolutions: tuple[str, ...]


def _refuse_untrainable(config: TrainConfig) -> None:
    """Raise UsageError for a config with nothing to train (--no-proj's baseline)."""
    if config.tower == "meanpool" and not config.proj:
        raise UsageError(
            "--no-proj is the parameter-free baseline: nothing to train; "
            "evaluate it with `twotower eval --data DIR --tower meanpool --no-proj`"
        )


def _resolve_restart(config: TrainConfig, world: World | None) -> Resolved:
    """config with --resume on when torchrun restarted the group (a restarted group always
    resumes); world: the torchrun launch, None outside torchrun."""
    if world is None or world.restart == 0:
        return Resolved(config)
    why = f"torchrun restarted the group (restart {world.restart})"
    return resolved_copy(config, "resume", why, resume=True)


def _setup_group(config: TrainConfig, run: RunDir, world: World | None) -> RunGroup:
    """The run's processes: `Solo` outside torchrun, else this rank's `Group` (its config
    checked first). Crash dumps are on from here; --tensorboard is refused (exit 2) here when
    TensorBoard's writer cannot be imported, before anything is written."""
    if world is not None:
        check_config(config, world)
    enable_crash_dumps()
    if config.tensorboard:
        summary_writer_class()
    if world is None:
        return Solo()
    if supervisor_pid() is not None:
        die_with_parent()  # torchrun ends a stuck rank by killing its guard
    device = backends.resolve(config.backend).removeprefix("torch-")
    ledger = CollectiveLedger(ledger_path(run.root, world.rank), world.restart + 1)
    return Group(world, device, config.collective_timeout, ledger)


def _open_dataset(config: TrainConfig) -> tuple[Resolved, Dataset]:
    """The dataset (memory-mapped), and config with --data resolved: --demo without --data
    trains on the demo data (written on first use)."""
    resolved = Resolved(config)
    if config.demo and config.data is None:
        why = "--demo without --data trains on the built-in demo data"
        resolved = resolved_copy(config, "data", why, data=str(demo_dataset().path))
    assert resolved.config.data is not None  # TrainConfig.validate: --data or --demo
    return resolved, load_dataset(resolved.config.data)


def _resolve_exclude_context(config: TrainConfig, dataset: Dataset) -> Resolved:
    """config with --exclude-context concrete (default: whether the data has context ids);
    refuses masking a dataset without ids."""
    has_ids = dataset.context_ids is not None
    masking = config.for_data(has_ids).exclude_context  # the one rule, shared with eval, replay
    why = f"the data {'has' if has_ids else 'has no'} context_ids.npy"
    resolved = resolved_copy(config, "seen-item masking", why, exclude_context=masking)
    if resolved.config.exclude_context:
        dataset.seen_ids(np.zeros(0, dtype=np.int64))  # refuses a dataset without ids
    return resolved


def _stored_config(config: TrainConfig, run: RunDir) -> dict[str, Any] | None:
    """RUN/config.json of the run being resumed (`read_settings`); None for a fresh run.
    Raises UsageError when it is unreadable."""
    if not (config.resume and run.config.is_file()):
        return None
    return read_settings(run.root)


def _setup_backend(config: TrainConfig, group: RunGroup, dataset: Dataset) -> Backend:
    """The compute engine for the dataset's vectors, joined to the run's processes."""
    backend = backends.make_backend(config, dataset.dim)
    group.join_backend(backend)
    return backend


def _refresh_queries(config: TrainConfig, split: HeldOut) -> int:
    """The most queries one refresh encodes and searches (what `--miner auto` weighs)."""
    queries = len(split.train_rows)
    if config.mine_scope == "upcoming":
        queries = min(queries, config.mine_every * config.batch_size)
    return queries


def _thread_budget(config: TrainConfig, group: RunGroup, dataset: Dataset) -> ThreadBudget:
    """The budget of `twotower.process.threads` for this config (--miner resolved): with a
    worker that searches beside training, the trainer drops to its share only while a search
    runs; a step too small to split runs on 1 thread."""
    in_worker = (
        config.hard_negatives > 0
        and miners.isolation_of(config.miner, config.miner_isolation) == "process"
    )
    overlapped = in_worker and mines_beside_training(config, config.miner, group)
    cores = group.cores(usable_cores())
    flops = step_flops(config, dataset.dim, dataset.seq_len, dataset.bank_size)
    return thread_budget(cores, config.threads, config.miner_threads, in_worker, overlapped, flops)


def accept(config: TrainConfig, on_worker_death: WorkerDeathReporter | None) -> Accepted:
    """Check everything that can be refused (UsageError, DataError) before anything is
    written: the tower, the torchrun world, the dataset, the run directory, the backend, the
    miners' options; resolve the settings that depend on them, each a new copy of the config
    with its line. on_worker_death: see `setup.open_run`."""
    lines: list[str] = []

    def take(resolved: Resolved) -> TrainConfig:
        if resolved.line is not None:
            lines.append(resolved.line)
        return resolved.config

    _refuse_untrainable(config)
    assert config.out is not None  # TrainConfig resolves it
    run = RunDir(config.out)
    world = launched_world()
    config = take(_resolve_restart(config, world))
    group = _setup_group(config, run, world)
    opened, dataset = group.rank_zero_first(lambda: _open_dataset(config))
    config = take(opened)
    config = take(_resolve_exclude_context(config, dataset))
    rows, backend_name = dataset.bank_size, backends.resolve(config.backend)
    started = _stored_config(config, run)  # a resumed run's choices, read before any check
    config = take(
        resolve_bank_negatives(config, dataset.dim, dataset.seq_len, rows, backend_name, started)
    )
    stored = check_run_dir(config, run)  # with every numeric setting resolved
    backend = _setup_backend(config, group, dataset)
    split = held_out(config, dataset)
    config = take(resolve_miner(config, dataset, _refresh_queries(config, split)))
    events = MinerEvents(run, on_worker_death)
    miner_setup = MinerSetup(config, dataset, events)
    threads = _thread_budget(config, group, dataset)
    miner_setup.make(threads.miner)  # options checked against the bank: may refuse
    return Accepted(
        config,
        run,
        stored,
        group,
        dataset,
        backend,
        split,
        miner_setup,
        events,
        threads,
        tuple(lines),
    )

"""A run's set-up in one place: check the input, open the dataset, the run directory, the
engines and the miners, restore the checkpoint, and return the `OpenedRun` the loop works on.

Everything that can be refused is checked before anything is written: the dataset, the run
directory (`resume.check_run_dir`), the backend and the miners' options.
"""

from __future__ import annotations

import logging
import os
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
from twotower.paths import user_cache_dir
from twotower.process import faults, wait_policy
from twotower.process.collective_ledger import CollectiveLedger, ledger_path
from twotower.process.crash_dump import die_with_parent, enable_crash_dumps
from twotower.process.openmp import openmp_runtimes
from twotower.process.phase import Phase
from twotower.process.stalls import StallWatch, what_to_do
from twotower.process.threads import (
    ThreadBudget,
    ThreadSwitch,
    limit_threads,
    thread_budget,
    usable_cores,
)
from twotower.run.disk import room_warning
from twotower.run.heartbeat import Heartbeat
from twotower.run.lock import RunLock, own_run
from twotower.run.rundir import MetricsLog, RunDir, open_log
from twotower.run.settings import read_settings, write_settings
from twotower.training.batching import StepPlan
from twotower.training.cost import step_flops
from twotower.training.demo import demo_dataset
from twotower.training.evaluation.cadence import (
    EVAL_BUDGET,
    EVALS_PER_EPOCH,
    auto_eval_every,
    plan_gaps,
    said_by,
)
from twotower.training.evaluation.heldout import HeldOut, held_out
from twotower.training.evaluation.validation import Validator
from twotower.training.negatives.bank_choice import BankChoice
from twotower.training.negatives.bank_choice import resolve as resolve_bank_negatives
from twotower.training.negatives.bank_negatives import BankNegatives, logq_table
from twotower.training.negatives.miner_setup import MinerSetup
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.queue import MemoryQueue
from twotower.training.negatives.refresh import MiningSchedule
from twotower.training.negatives.refresher import Refresher, make_probe_miner, mines_beside_training
from twotower.training.phase_points import PhasePoints, supervisor_pid
from twotower.training.ranks.distributed import Group, check_config, launched_world
from twotower.training.ranks.solo import RunGroup, Solo
from twotower.training.resume import check_run_dir, restore
from twotower.training.schedule import LRSchedule, planned_steps
from twotower.training.step import StepState
from twotower.training.tensorboard import TensorboardScalars, summary_writer_class

log = logging.getLogger("twotower")

# (RUN/crashes, the miner chain's crash event with the worker's evidence) -> the report written
WorkerDeathReporter = Callable[[Path, dict[str, Any]], Path]


@dataclass
class OpenedRun:
    """A run set up to train: what the loop reads and changes.

    state: the step's state (engine, queue, table, plans); start: steps done (0, or the
    checkpoint's); total: planned steps; metrics_at_start: the checkpoint's last evaluation;
    validator: evaluations (None on a torchrun rank other than 0); scalars: --tensorboard;
    stalls: the watch of the step times (`process.stalls`); threads: the trainer's thread
    count for a step or an evaluation (`process.threads`).
    """

    config: TrainConfig
    run: RunDir
    group: RunGroup
    dataset: Dataset
    state: StepState
    refresher: Refresher
    points: PhasePoints
    metrics: MetricsLog
    scalars: TensorboardScalars | None
    validator: Validator | None
    stalls: StallWatch
    threads: ThreadSwitch
    start: int
    total: int
    eval_every: int
    metrics_at_start: dict[str, float]
    lock: RunLock | None = None  # the writer's lock (untaken where its supervisor holds it)

    def close(self) -> None:
        """End the run's hold on its directory: the phase points, then the writer's lock."""
        self.points.close()
        if self.lock is not None:
            self.lock.release()


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


def _join(config: TrainConfig, run: RunDir) -> RunGroup:
    """The run's processes: `Solo` outside torchrun, else this rank's `Group` (its config
    checked first; a restarted group always resumes). Crash dumps are on from here."""
    world = launched_world()
    if world is not None:
        check_config(config, world)
        config.resume = config.resume or world.restart > 0  # torchrun restarted the group
    enable_crash_dumps()
    if config.tensorboard:
        summary_writer_class()  # refused (exit 2) before anything is written
    if world is None:
        return Solo()
    if supervisor_pid() is not None:
        die_with_parent()  # torchrun ends a stuck rank by killing its guard
    device = backends.resolve(config.backend).removeprefix("torch-")
    ledger = CollectiveLedger(ledger_path(run.root, world.rank), world.restart + 1)
    return Group(world, device, config.collective_timeout, ledger)


def _open_dataset(config: TrainConfig) -> Dataset:
    if config.demo and config.data is None:
        config.data = str(demo_dataset().path)
    assert config.data is not None
    return load_dataset(config.data)


def _thread_budget(config: TrainConfig, group: RunGroup, dataset: Dataset) -> ThreadBudget:
    """The budget of `twotower.process.threads` for this config: with a worker that searches
    beside training, the trainer drops to its share only while a search runs; a step too
    small to split runs on 1 thread."""
    in_worker = (
        config.hard_negatives > 0
        and miners.isolation_of(config.miner, config.miner_isolation) == "process"
    )
    overlapped = in_worker and mines_beside_training(config, config.miner, group)
    cores = group.cores(usable_cores())
    flops = step_flops(config, dataset.dim, dataset.seq_len, dataset.bank_size)
    return thread_budget(cores, config.threads, config.miner_threads, in_worker, overlapped, flops)


def _open_run_files(
    config: TrainConfig, run: RunDir, group: RunGroup, write_config: bool
) -> tuple[Heartbeat, MetricsLog, TensorboardScalars | None]:
    """Rank 0 (or the only process) prepares the run directory, config.json, log.txt and
    metrics.jsonl; another rank logs warnings to stderr only and keeps its own heartbeat.
    -> (heartbeat, metrics log, TensorBoard scalars or None)."""
    heartbeat = Heartbeat(group.heartbeat_path(run))
    if group.writes_run_files:
        run.prepare()
        if write_config:
            write_settings(run.root, config)
        open_log(run.log)
        scalars = TensorboardScalars(config.tensorboard) if config.tensorboard else None
        metrics = MetricsLog(run.metrics, also=scalars)
    else:
        open_log(Path(os.devnull), echo=False)
        scalars = None
        metrics = MetricsLog(Path(os.devnull))
    group.meet(run)  # the run directory exists for every rank's heartbeat
    return heartbeat, metrics, scalars


def _eval_cadence(config: TrainConfig, dataset: Dataset, split: HeldOut, plan: StepPlan) -> int:
    """--eval-every, or the automatic cadence (evaluation/cadence.py), logged either way."""
    if config.eval_every is not None:
        every = config.eval_every
        how = said_by(config, "eval_every")
    else:
        every = auto_eval_every(
            config,
            dataset.dim,
            dataset.seq_len,
            len(split.eval_rows),
            split.eval_dataset.bank_size,
            plan.batches_per_epoch,
            dataset.bank_size,
        )
        how = (
            f"auto: about {EVAL_BUDGET:.0%} of the training compute, "
            f"at most {EVALS_PER_EPOCH} times an epoch"
        )
    if every:
        log.info("evaluating every %d steps (%s)", every, how)
    return every


def _eval_miner(config: TrainConfig, dataset: Dataset) -> miners.Miner:
    """An evaluation miner over a validation set's own bank (--eval-data); the run's
    dataset gets its evaluation miner from MinerSetup."""
    miner = miners.get_for(config, config.eval_miner, user_cache_dir() / "index", fault_phase=None)
    miner.build(dataset.bank, fingerprint=dataset.fingerprint)
    return miner


@dataclass
class Accepted:
    """A run's input checked, nothing written yet: the config as the data resolves it, the run
    directory and its stored config (None: none), the processes, dataset, engine, held-out
    split, miners (made and checked, not built), thread budget, and what `--bank-negatives
    auto` chose (None: it was not auto)."""

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
    bank_choice: BankChoice | None


def _stored_config(config: TrainConfig, run: RunDir) -> dict[str, Any] | None:
    """RUN/config.json of the run being resumed (`read_settings`); None for a fresh run.
    Raises UsageError when it is unreadable."""
    if not (config.resume and run.config.is_file()):
        return None
    return read_settings(run.root)


def accept(config: TrainConfig, on_worker_death: WorkerDeathReporter | None) -> Accepted:
    """Check everything that can be refused (UsageError, DataError) before anything is
    written: the tower, the torchrun world, the dataset, the run directory, the backend, the
    miners' options. on_worker_death: see `open_run`."""
    c = config
    if c.tower == "meanpool" and not c.proj:
        raise UsageError(
            "--no-proj is the parameter-free baseline: nothing to train; "
            "evaluate it with `twotower eval --data DIR --tower meanpool --no-proj`"
        )
    assert c.out is not None  # TrainConfig resolves it
    run = RunDir(c.out)
    group = _join(c, run)
    dataset = group.rank_zero_first(lambda: _open_dataset(c))
    c = c.for_data(dataset.context_ids is not None)
    if c.exclude_context:
        dataset.seen_ids(np.zeros(0, dtype=np.int64))  # refuses a dataset without ids
    bank_choice = resolve_bank_negatives(  # in place, before config.json is compared or written
        c,
        dataset.dim,
        dataset.seq_len,
        dataset.bank_size,
        backends.resolve(c.backend),
        _stored_config(c, run),
    )
    stored = check_run_dir(c, run)
    backend = backends.make_backend(c, dataset.dim)
    group.join_backend(backend)
    split = held_out(c, dataset)
    refresh_queries = len(split.train_rows)  # the most one refresh encodes and searches
    if c.mine_scope == "upcoming":
        refresh_queries = min(refresh_queries, c.mine_every * c.batch_size)
    events = MinerEvents(run, on_worker_death)
    miner_setup = MinerSetup(c, dataset, refresh_queries, events)
    threads = _thread_budget(c, group, dataset)  # after --miner auto is resolved
    miner_setup.make(threads.miner)  # options checked against the bank: may refuse
    return Accepted(
        c, run, stored, group, dataset, backend, split, miner_setup, events, threads, bank_choice
    )


def open_run(config: TrainConfig, on_worker_death: WorkerDeathReporter | None) -> OpenedRun:
    """Set the run up (see the module docstring): `accept`, then the run files, the plans, the
    checkpoint, the indexes, the validator and the refresher; logs the `start` event.

    on_worker_death(RUN/crashes, event) writes a dead miner worker's crash report and
    returns its path (None: the death is only logged). The caller calls `close()`. Raises
    RunInUse when another trainer writes the run.
    """
    a = accept(config, on_worker_death)
    lock, took_over = own_run(a.run.root, supervisor_pid(), a.group.writes_run_files)
    try:
        write_config = a.stored is None
        heartbeat, metrics, scalars = _open_run_files(a.config, a.run, a.group, write_config)
    except BaseException:
        lock.release()
        raise
    if took_over:
        log.warning("%s", took_over)
    a.events.metrics = metrics
    points = PhasePoints(heartbeat, a.backend.name, a.config.miner)
    try:
        if not a.group.arms_faults():
            os.environ.pop(faults.ENV_VAR, None)  # nor do this rank's miner workers
        faults.arm(a.run.faults)
        points.name_phase(Phase.LOAD)
        a.miners.log_choice()
        if a.bank_choice is not None:
            c = a.config
            log.info("--bank-negatives auto: %s (%s)", c.bank_negatives, a.bank_choice.reason)
        opened = _load(a, points, metrics, scalars)
    except BaseException:
        points.close()
        lock.release()
        raise
    opened.lock = lock
    return opened


def _load(
    a: Accepted, points: PhasePoints, metrics: MetricsLog, scalars: TensorboardScalars | None
) -> OpenedRun:
    """The second half of `open_run`, once the run files are open."""
    c, dataset, backend, split, group = a.config, a.dataset, a.backend, a.split, a.group
    plan = StepPlan(split.train_rows, c.batch_size, c.seed)
    total = planned_steps(c, plan.batches_per_epoch)
    schedule = LRSchedule.of(c, total)
    eval_every = _eval_cadence(c, dataset, split, plan)
    queue = MemoryQueue(c.queue_size, dataset.dim)
    table = HardNegativeTable.empty(dataset.num_samples, c.mine_pool)
    mining = MiningSchedule.of(c, plan, total)
    for gap in plan_gaps(c, total, eval_every) if group.writes_run_files else []:
        log.warning("%s", gap)
    restored = restore(c, a.run, backend, queue, table, mining)
    if group.writes_run_files:
        size = sum(array.nbytes for array in {**backend.state(), **queue.state()}.values())
        if short := room_warning(a.run.root, size, c.keep_checkpoints):
            log.warning("%s", short)
    a.miners.search_params = restored.search_params  # set again after the build
    step = restored.step
    mirror = getattr(backend, "queue_mirror", None)  # the ring on the backend's device
    queue.attach(mirror(queue.ids, queue.vecs) if mirror else None)
    faults.set_step(step)
    points.name_phase(Phase.BUILD_INDEX)  # a worker's load-index or build-index refines it
    group.rank_zero_first(a.miners.build)  # rank 0 fills the index cache first
    miner = points.miner = a.miners.miner
    validator = None
    if group.writes_run_files:  # ranks other than 0 do not evaluate
        eval_miner = (
            a.miners.eval_miner
            if split.eval_dataset is dataset
            else _eval_miner(c, split.eval_dataset)
        )
        validator = Validator(c, split, eval_miner, metrics, restored.selection)
        log.info("%s", split.describe())
    pools = limit_threads(a.threads.trainer)  # after the engines have loaded theirs
    points.heartbeat.describe(
        threads=a.threads.as_dict(), threadpools=pools, wait_policy=wait_policy.describe()
    )
    switch = ThreadSwitch(a.threads, lambda pools: points.heartbeat.describe(threadpools=pools))
    log.info("threads wait: %s", wait_policy.describe())

    probe = make_probe_miner(c, dataset) if c.hard_negatives else None
    refresher = Refresher(
        c,
        dataset,
        backend,
        mining,
        group,
        a.run,
        metrics,
        points,
        switch,
        a.miners,
        probe,
        restored.table_path,
        restored.pending,
    )
    refresher.resume()  # a refresh in flight at the checkpoint is searched again
    points.openmp = openmp_runtimes()
    log.info("threads: %s", a.threads.describe())
    stepping = a.threads.count(stepping=True, searching=False)
    stalls = StallWatch(a.threads.cores, stepping, advice=what_to_do(stepping))
    points.enter(Phase.LOAD, step)
    if c.lr_schedule != "constant" or schedule.warmup:
        log.info(
            "lr %g, %d warm-up steps, then %s over %d steps",
            c.lr,
            schedule.warmup,
            c.lr_schedule,
            total,
        )
    metrics.write(
        "start",
        step=step,
        total_steps=total,
        backend=backend.name,
        miner=points.miner_name,
        miner_build=dict(getattr(miner, "build_info", {})),
        samples=dataset.num_samples,
        train=len(split.train_rows),
        eval=len(split.eval_rows),
        split=split.kind,
        eval_every=eval_every,
        lr_schedule=c.lr_schedule,
        warmup_steps=schedule.warmup,
        bank_negatives=c.bank_negatives,
        sampled_negatives=c.sampled_negatives,
        pid=os.getpid(),
    )
    log_freq = None
    if c.logq:
        positives = dataset.positives[split.train_rows]
        log_freq = logq_table(a.run.root, positives, dataset.bank_size, group.writes_run_files)
    from_bank = BankNegatives(c.bank_negatives, c.sampled_negatives or 0, dataset.bank, log_freq)
    state = StepState(
        c, dataset.bank, plan, mining, schedule, backend, queue, restored.table, from_bank
    )
    return OpenedRun(
        c,
        a.run,
        group,
        dataset,
        state,
        refresher,
        points,
        metrics,
        scalars,
        validator,
        stalls,
        switch,
        step,
        total,
        eval_every,
        restored.metrics,
    )

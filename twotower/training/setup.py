"""A run's set-up as named steps: `setup_checks.accept` (every refusal before anything is
written, every setting resolved as a new copy of the config), then the run files, the plans,
the checkpoint, the indexes, the validator, the threads and the refresher; `open_run` returns
the `OpenedRun` the loop works on.

Each `_setup_*` step takes what it needs and returns one object, so the order follows from
what each step takes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from twotower import miners
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.paths import user_cache_dir
from twotower.process import faults, wait_policy
from twotower.process.openmp import openmp_runtimes
from twotower.process.phase import Phase
from twotower.process.stalls import StallWatch, what_to_do
from twotower.process.threads import ThreadSwitch, limit_threads
from twotower.run.disk import room_warning
from twotower.run.heartbeat import Heartbeat
from twotower.run.lock import RunLock, own_run
from twotower.run.rundir import MetricsLog, RunDir, open_log
from twotower.run.settings import write_settings
from twotower.training.batching import StepPlan
from twotower.training.evaluation.cadence import (
    EVAL_BUDGET,
    EVALS_PER_EPOCH,
    auto_eval_every,
    plan_gaps,
    said_by,
)
from twotower.training.evaluation.heldout import HeldOut
from twotower.training.evaluation.validation import Validator
from twotower.training.negatives.bank_negatives import BankNegatives, logq_table
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.queue import MemoryQueue
from twotower.training.negatives.refresh import MiningSchedule
from twotower.training.negatives.refresher import Refresher, make_probe_miner
from twotower.training.phase_points import PhasePoints, supervisor_pid
from twotower.training.ranks.solo import RunGroup
from twotower.training.resume import Restored, restore
from twotower.training.schedule import LRSchedule, planned_steps
from twotower.training.setup_checks import Accepted, WorkerDeathReporter, accept
from twotower.training.step import StepState
from twotower.training.tensorboard import TensorboardScalars

__all__ = ["OpenedRun", "WorkerDeathReporter", "open_run"]

log = logging.getLogger("twotower")


@dataclass
class OpenedRun:
    """A run set up to train: what the loop reads and changes.

    state: the step's state (the resolved config, engine, queue, table, plans: the planned
    total is `state.schedule.total`); start: steps done (0, or the checkpoint's);
    metrics_at_start: the checkpoint's last evaluation;
    validator: evaluations (None on a torchrun rank other than 0); scalars: --tensorboard;
    stalls: the watch of the step times (`process.stalls`); threads: the trainer's thread
    count for a step or an evaluation (`process.threads`).
    """

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
    eval_every: int
    metrics_at_start: dict[str, float]
    lock: RunLock  # the writer's lock (untaken where its supervisor holds it)

    def close(self) -> None:
        """End the run's hold on its directory: the phase points, then the writer's lock."""
        self.points.close()
        self.lock.release()


@dataclass(frozen=True)
class Plans:
    """What the config and the split fix for the whole run: the rows of each step, the planned
    total, the learning-rate and refresh schedules, and the evaluation cadence."""

    plan: StepPlan
    total: int
    schedule: LRSchedule
    mining: MiningSchedule
    eval_every: int


def _open_run_files(
    config: TrainConfig, run: RunDir, group: RunGroup, write_config: bool
) -> tuple[Heartbeat, MetricsLog, TensorboardScalars | None]:
    """Rank 0 (or the only process) prepares the run directory, config.json (the resolved
    config), log.txt and metrics.jsonl; another rank logs warnings to stderr only and keeps
    its own heartbeat. -> (heartbeat, metrics log, TensorBoard scalars or None)."""
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


def _setup_plans(config: TrainConfig, dataset: Dataset, split: HeldOut, group: RunGroup) -> Plans:
    """The run's plans from the config and the training rows; rank 0 warns of a cadence the
    plan never reaches."""
    plan = StepPlan(split.train_rows, config.batch_size, config.seed)
    total = planned_steps(config, plan.batches_per_epoch)
    schedule = LRSchedule.of(config, total)
    eval_every = _eval_cadence(config, dataset, split, plan)
    mining = MiningSchedule.of(config, plan, total)
    for gap in plan_gaps(config, total, eval_every) if group.writes_run_files else []:
        log.warning("%s", gap)
    return Plans(plan, total, schedule, mining, eval_every)


def _setup_restored(a: Accepted, plans: Plans, queue: MemoryQueue) -> Restored:
    """The newest valid checkpoint restored into the engine and `queue` (step 0 and an empty
    table for a fresh run); rank 0 warns when the disk is short of a checkpoint's room."""
    table = HardNegativeTable.empty(a.dataset.num_samples, a.config.mine_pool)
    restored = restore(a.config, a.run, a.backend, queue, table, plans.mining)
    if a.group.writes_run_files:
        size = sum(array.nbytes for array in {**a.backend.state(), **queue.state()}.values())
        if short := room_warning(a.run.root, size, a.config.keep_checkpoints):
            log.warning("%s", short)
    mirror = getattr(a.backend, "queue_mirror", None)  # the ring on the backend's device
    queue.attach(mirror(queue.ids, queue.vecs) if mirror else None)
    return restored


def _eval_miner(config: TrainConfig, dataset: Dataset) -> miners.Miner:
    """An evaluation miner over a validation set's own bank (--eval-data); the run's
    dataset gets its evaluation miner from MinerSetup."""
    miner = miners.get_for(config, config.eval_miner, user_cache_dir() / "index", fault_phase=None)
    miner.build(dataset.bank, fingerprint=dataset.fingerprint)
    return miner


def _build_indexes(a: Accepted, points: PhasePoints, restored: Restored) -> miners.Miner:
    """The run's indexes built (rank 0 first: it fills the index cache), the mining miner
    searching as the checkpoint had raised it. Returns the built evaluation miner."""
    points.name_phase(Phase.BUILD_INDEX)  # a worker's load-index or build-index refines it
    a.group.rank_zero_first(lambda: a.miners.build(restored.search_params))
    points.miner = a.miners.miner
    return a.miners.eval_miner


def _setup_validator(
    a: Accepted, metrics: MetricsLog, restored: Restored, built: miners.Miner
) -> Validator | None:
    """The run's evaluations, resuming the checkpoint's selection, with `built` (the run's
    evaluation miner) or a validation set's own; None on a torchrun rank other than 0 (they
    do not evaluate)."""
    if not a.group.writes_run_files:
        return None
    split = a.split
    own = split.eval_dataset is a.dataset
    eval_miner = built if own else _eval_miner(a.config, split.eval_dataset)
    validator = Validator(a.config, split, eval_miner, metrics, restored.selection)
    log.info("%s", split.describe())
    return validator


def _setup_threads(a: Accepted, points: PhasePoints) -> ThreadSwitch:
    """The trainer's thread pools limited to its share (after the engines have loaded theirs)
    and the switch between a step's and a search's counts, shown in the heartbeat."""
    pools = limit_threads(a.threads.trainer)
    points.heartbeat.describe(
        threads=a.threads.as_dict(), threadpools=pools, wait_policy=wait_policy.describe()
    )
    switch = ThreadSwitch(a.threads, lambda pools: points.heartbeat.describe(threadpools=pools))
    log.info("threads wait: %s", wait_policy.describe())
    return switch


def _setup_refresher(
    a: Accepted,
    plans: Plans,
    metrics: MetricsLog,
    points: PhasePoints,
    switch: ThreadSwitch,
    restored: Restored,
) -> Refresher:
    """The run's hard-negative refreshes, with a refresh in flight at the checkpoint searched
    again."""
    c = a.config
    probe = make_probe_miner(c, a.dataset) if c.hard_negatives else None
    refresher = Refresher(
        c,
        a.dataset,
        a.backend,
        plans.mining,
        a.group,
        a.run,
        metrics,
        points,
        switch,
        a.miners,
        probe,
        restored.table_path,
        restored.pending,
    )
    refresher.resume()
    return refresher


def _setup_stalls(a: Accepted, points: PhasePoints) -> StallWatch:
    """The watch of the step times, for the thread count a step runs on."""
    points.openmp = openmp_runtimes()
    log.info("threads: %s", a.threads.describe())
    stepping = a.threads.count(stepping=True, searching=False)
    return StallWatch(a.threads.cores, stepping, advice=what_to_do(stepping))


def _log_start(
    a: Accepted, plans: Plans, points: PhasePoints, metrics: MetricsLog, step: int
) -> None:
    """The learning-rate plan (when not constant) and the `start` event."""
    c, split, schedule = a.config, a.split, plans.schedule
    if c.lr_schedule != "constant" or schedule.warmup:
        log.info(
            "lr %g, %d warm-up steps, then %s over %d steps",
            c.lr,
            schedule.warmup,
            c.lr_schedule,
            plans.total,
        )
    metrics.write(
        "start",
        step=step,
        total_steps=plans.total,
        backend=a.backend.name,
        miner=points.miner_name,
        miner_build=dict(getattr(a.miners.miner, "build_info", {})),
        samples=a.dataset.num_samples,
        train=len(split.train_rows),
        eval=len(split.eval_rows),
        split=split.kind,
        eval_every=plans.eval_every,
        lr_schedule=c.lr_schedule,
        warmup_steps=schedule.warmup,
        bank_negatives=c.bank_negatives,
        sampled_negatives=c.sampled_negatives,
        pid=os.getpid(),
    )


def _setup_bank_negatives(a: Accepted) -> BankNegatives:
    """What each step takes from the whole bank (--bank-negatives resolved), with the logQ
    table of the training positives under --logq."""
    c, dataset = a.config, a.dataset
    log_freq = None
    if c.logq:
        positives = dataset.positives[a.split.train_rows]
        log_freq = logq_table(a.run.root, positives, dataset.bank_size, a.group.writes_run_files)
    return BankNegatives(c.bank_negatives, c.sampled_negatives or 0, dataset.bank, log_freq)


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
        for line in a.resolutions:  # what the set-up resolved, and why
            log.info("%s", line)
        a.miners.log_warnings()
        return _load(a, points, metrics, scalars, lock)
    except BaseException:
        points.close()
        lock.release()
        raise


def _load(
    a: Accepted,
    points: PhasePoints,
    metrics: MetricsLog,
    scalars: TensorboardScalars | None,
    lock: RunLock,
) -> OpenedRun:
    """The second half of `open_run`, once the run files are open: the named steps in the
    order their inputs give."""
    c = a.config
    plans = _setup_plans(c, a.dataset, a.split, a.group)
    queue = MemoryQueue(c.queue_size, a.dataset.dim)
    restored = _setup_restored(a, plans, queue)
    step = restored.step
    faults.set_step(step)
    eval_miner = _build_indexes(a, points, restored)
    validator = _setup_validator(a, metrics, restored, eval_miner)
    switch = _setup_threads(a, points)
    refresher = _setup_refresher(a, plans, metrics, points, switch, restored)
    stalls = _setup_stalls(a, points)
    points.enter(Phase.LOAD, step)
    _log_start(a, plans, points, metrics, step)
    from_bank = _setup_bank_negatives(a)
    state = StepState(
        c,
        a.dataset.bank,
        plans.plan,
        plans.mining,
        plans.schedule,
        a.backend,
        queue,
        restored.table,
        from_bank,
    )
    return OpenedRun(
        a.run,
        a.group,
        a.dataset,
        state,
        refresher,
        points,
        metrics,
        scalars,
        validator,
        stalls,
        switch,
        step,
        plans.eval_every,
        restored.metrics,
        lock,
    )

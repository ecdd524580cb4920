"""The backend-agnostic training loop: batches -> negatives -> step -> checkpoint.

`train(config)` runs in this process. Everything a step depends on follows
from the checkpoint (parameters, optimizer, queue, mined table) and the step
number (batch rows, sampled hard negatives), so a resumed run continues bit
for bit where the interrupted one would have gone, on the same backend.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from twotower import backends, miners
from twotower.batch import StepStats
from twotower.config import TrainConfig
from twotower.data import Dataset, load_dataset
from twotower.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError
from twotower.paths import user_cache_dir
from twotower.process import faults
from twotower.process.collective_ledger import CollectiveLedger, ledger_path
from twotower.process.crash_dump import SUPERVISOR_PID_ENV, die_with_parent, enable_crash_dumps
from twotower.process.openmp import openmp_runtimes
from twotower.process.threads import ThreadBudget, limit_threads, thread_budget, usable_cores
from twotower.progress import install as install_progress_sink
from twotower.training.batching import Prefetcher, StepData, StepPlan, assemble_batch
from twotower.training.cadence import EVAL_BUDGET, EVALS_PER_EPOCH, auto_eval_every
from twotower.training.checkpoint import (
    BEST_DIR,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from twotower.training.demo import demo_dataset
from twotower.training.distributed import Group, ShardPlan, check_config, launched_world
from twotower.training.evaluation import encode_rows
from twotower.training.heartbeat import Heartbeat
from twotower.training.heldout import HeldOut, held_out
from twotower.training.miner_setup import MinerSetup
from twotower.training.mining import HardNegativeTable
from twotower.training.phases import PhaseReporter
from twotower.training.queue import MemoryQueue
from twotower.training.refresh import (
    Mined,
    MiningJob,
    MiningSchedule,
    Refresh,
    describe_refresh,
    is_approximate,
    load_refresh,
    recall_warning,
    run_refresh,
)
from twotower.training.rundir import MetricsLog, RunDir, open_log
from twotower.training.schedule import LRSchedule, planned_steps
from twotower.training.selection import Selection
from twotower.training.tensorboard import TensorboardScalars, summary_writer_class
from twotower.training.validation import Validator

log = logging.getLogger("twotower")

_T = TypeVar("_T")
PROGRESS_ENV = "TWOTOWER_PROGRESS"  # "1": show the progress bar even when stderr is a pipe
# (RUN/crashes, the miner chain's crash event with the worker's evidence) -> the report written
WorkerDeathReporter = Callable[[Path, dict[str, Any]], Path]


@dataclass
class RunResult:
    """How a run ended.

    exit_code: 0 done (early stop included), 130 interrupted (a checkpoint was
    written), 3 gave up (supervisor). steps: steps completed. metrics: the last
    evaluation; metrics_before: the evaluation before the first step of a fresh run.
    best_step, best_metrics: the evaluation RUN/best/ holds (None, {}: none yet).
    stopped_early: --patience ended the run. attempts: one summary per child process
    (supervised runs only).
    """

    run_dir: Path
    exit_code: int
    steps: int
    backend: str
    miner: str
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_before: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived; the loop checkpoints and ends with exit code 130."""


class Trainer:
    """One training run over a dataset, on one backend (see `train`)."""

    def __init__(self, config: TrainConfig, on_worker_death: WorkerDeathReporter | None = None):
        self.config = config
        self.on_worker_death = on_worker_death
        assert config.out is not None  # TrainConfig resolves it
        self.run = RunDir(config.out)
        self.miner: miners.Miner | None = None
        self.table_path: Path | None = None
        self.pending: Refresh | None = None  # the refresh taken and not yet in use
        self.job: MiningJob | None = None  # its search
        self.sharing_cores = False  # a refresh is taken and not used: the trainer has its share
        self.search_threads: int | None = None  # its threads meanwhile, as threadpoolctl read them
        self.probe_miner: miners.Miner | None = None
        self._stop_signal: int | None = None
        self.steps_done = 0  # what a stop request checkpoints: the last completed step ...
        self.last_metrics: dict[str, float] = {}  # ... and the last evaluation
        self.stopped_early = False  # --patience ended the run
        self.validator: Validator | None = None  # evaluations (None: a rank other than 0)
        self.openmp: list[str] | None = None  # OpenMP runtimes here (None: unknown), for reports
        self.rss_kb = 0  # resident memory at the last phase point (the heartbeat's reading)
        supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
        self._supervisor_pid = int(supervisor) if supervisor.isdigit() else None
        self.world = launched_world()  # None: not started by torchrun
        self.group: Group | None = None  # the process group, once joined
        self.writes_run_files = self.world is None or self.world.writes_run_files

    # --- set-up: everything that can be refused is checked before anything is written ---

    def _open_dataset(self) -> Dataset:
        if self.config.demo and self.config.data is None:
            self.config.data = str(demo_dataset().path)
        assert self.config.data is not None
        return load_dataset(self.config.data)

    def _check_run_dir(self) -> dict[str, Any] | None:
        """The run's stored config when resuming; refuse to overwrite an earlier run."""
        has_checkpoints = bool(list_checkpoints(self.run.root)) if self.run.root.exists() else False
        if not self.config.resume:
            if has_checkpoints:
                raise UsageError(
                    f"{self.run.root} already holds checkpoints of an earlier run; "
                    "pass --resume to continue it or choose another --out"
                )
            return None
        if not self.run.config.exists():
            return None
        try:
            stored = json.loads(self.run.config.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"{self.run.config}: unreadable ({error}); cannot resume") from None
        differences = self.config.numeric_differences(stored)
        if differences and has_checkpoints:
            raise UsageError(
                f"{self.run.config}: --resume with settings that change the numbers "
                f"({'; '.join(differences)}); start a new run with another --out"
            )
        return stored

    def _make_eval_miner(self, dataset: Dataset) -> miners.Miner:
        """An evaluation miner over a validation set's own bank (--eval-data); the run's
        dataset gets its evaluation miner from MinerSetup."""
        c = self.config
        miner = miners.get_for(c, c.eval_miner, user_cache_dir() / "index", fault_phase=None)
        miner.build(dataset.bank, fingerprint=dataset.fingerprint)
        return miner

    def _thread_budget(self) -> ThreadBudget:
        """The budget of `twotower.process.threads` for this config: with a worker that searches
        beside training, the trainer drops to its share only while a search runs."""
        c = self.config
        in_worker = c.hard_negatives > 0 and self._miner_isolation(c.miner) == "process"
        cores = usable_cores()
        if self.world is not None:  # the ranks on this machine share its cores
            cores = max(1, cores // self.world.local_size)
        overlapped = in_worker and self._mines_beside_training(c.miner)
        return thread_budget(cores, c.threads, c.miner_threads, in_worker, overlapped)

    def _miner_isolation(self, miner: str) -> str:
        """'process' or 'none': where `miner` searches (--miner-isolation, else its default)."""
        return miners.isolation_of(miner, self.config.miner_isolation)

    def _mines_beside_training(self, miner: str) -> bool:
        """Whether a refresh is searched in a thread beside training: --mine-overlap, else
        when the miner has its own process (it competes least with training there); never
        under torchrun, whose ranks' collectives must stay in one order."""
        if self.world is not None:
            return False
        if self.config.mine_overlap is not None:
            return self.config.mine_overlap
        return self._miner_isolation(miner) != "none"

    def _make_probe_miner(self) -> miners.Miner | None:
        """The exact miner the recall probe compares with; None when no miner of the chain
        is approximate or the probe is off."""
        c = self.config
        chain = [c.miner, *c.miner_fallback]
        if not c.mine_probe or not any(is_approximate(name, c.faiss_index) for name in chain):
            return None
        exact = miners.get("exact", isolation="none", fault_phase=None)
        exact.build(self.dataset.bank, fingerprint=self.dataset.fingerprint)
        return exact

    def _miner_event(self, event: dict[str, Any]) -> None:
        """Log a miner chain event; a worker's death also gets its crash report."""
        fields = {k: v for k, v in event.items() if k not in ("event", "worker")}
        if not hasattr(self, "metrics"):  # before the run directory is accepted: log only
            log.warning("miner: %s", ", ".join(f"{k}={v}" for k, v in fields.items()))
            return
        if event.get("worker") and self.on_worker_death is not None:
            report = self.on_worker_death(self.run.crashes, event)
            fields["report"] = str(report.relative_to(self.run.root))
        self.metrics.write(f"miner-{event.get('event', 'event')}", **fields)
        log.warning("miner: %s", ", ".join(f"{k}={v}" for k, v in fields.items()))

    # --- phase points: heartbeat + fault switch -------------------------------------------

    def _phase(self, phase: str, step: int) -> bool:
        """Enter `phase` at `step`: heartbeat, then the fault switch. True: poison the loss.

        The `mine` fault point is reached by the miner itself, in the process
        where it searches (its worker, when isolated), not here.
        """
        faults.set_step(step)
        self.phases.enter(phase)
        if self._supervisor_pid not in (None, os.getppid()) and self._stop_signal is None:
            log.warning(
                "the supervisor (pid %s) is gone: stopping after this step", self._supervisor_pid
            )
            self._stop_signal = signal.SIGHUP
        if phase == "mine":
            return False
        return faults.point(phase, [self.backend.name, self.miner_name])

    def _beat(self, phase: str, fields: dict[str, Any]) -> None:
        """Write the heartbeat: `phase` at the current step, the engines, `fields` (progress)."""
        beat = self.heartbeat.beat(
            faults.current_step(),
            phase,
            backend=self.backend.name,
            miner=self.miner_name,
            openmp=self.openmp,
            **fields,
        )
        self.rss_kb = beat["rss_kb"]

    @property
    def miner_name(self) -> str:
        return self.miner.name if self.miner is not None else self.config.miner

    # --- the pieces of a step ---------------------------------------------------------------

    def _take_refresh(self, step: int) -> None:
        """If a refresh is taken at `step`: encode its rows now and hand them to the miner."""
        use = self.mining.use_taken_at(step)
        if use is None:
            return
        self._phase("encode", step)
        rows = self.mining.rows(use)
        started = time.perf_counter()
        queries = encode_rows(self.backend, self.dataset.gather, rows, label="mine: encode")
        self._submit(Refresh(step, use, rows, queries, time.perf_counter() - started))

    def _submit(self, refresh: Refresh) -> None:
        """Start the search of `refresh`: beside training, or now in this thread."""
        assert self.miner is not None, "mining needs --hard-negatives > 0"
        self.pending = refresh
        background = self._mines_beside_training(self.miner.name)
        if not background:  # a crash of an in-process miner is blamed on the mine phase
            self._phase("mine", refresh.take)
        else:
            self._share_cores(True)
        self.job = MiningJob(refresh, self._run_refresh, self.miner, background)

    def _share_cores(self, searching: bool) -> None:
        """Limit the trainer to its share of the cores from the step a refresh is taken (its
        worker searches) to the step it is used or abandoned, or give it its whole budget
        again. The switches follow from the config, not from when the search ends: torch's
        results depend on the thread count in their last bits, and a rerun or a resumed run
        must compute every step on the same count. The pools threadpoolctl reads after a
        switch go into the heartbeat; `search_threads` keeps the share for the metrics."""
        if self.threads.trainer_beside_search == self.threads.trainer:
            return
        if searching != self.sharing_cores:
            count = self.threads.trainer_beside_search if searching else self.threads.trainer
            pools = limit_threads(count)
            self.heartbeat.describe(threadpools=pools)
            if searching:
                self.search_threads = max((pool["num_threads"] for pool in pools), default=None)
            self.sharing_cores = searching

    def _run_refresh(self, refresh: Refresh, miner: miners.Miner) -> Mined:
        if self.group is None:
            return run_refresh(refresh, miner, self.probe_miner, self.dataset, self.config)

        def share(rows: np.ndarray) -> np.ndarray:  # this rank's part of the encoded queries
            return refresh.queries[np.searchsorted(refresh.rows, rows)]

        started = time.perf_counter()
        with faults.at_step(refresh.take):
            table, report = self.group.mine(miner, share, self.dataset, refresh.rows, self.config)
        return Mined(table, report, miner.name, time.perf_counter() - started, None)

    def _use_refresh(self, step: int) -> None:
        """Put the refresh used at `step` into use, waiting for its search if it still runs."""
        assert self.job is not None and self.pending is not None and self.pending.use == step
        self._phase("mine", step)
        try:
            mined, waited = self.job.result()
        finally:
            self._share_cores(False)
        refresh = self.pending
        self.table = mined.table
        self.table_path = self.run.mined / f"table-{step_dir_name(step)}.npy"
        if self.writes_run_files:
            self.table.save(self.table_path)
        self.job = self.pending = None
        probe = mined.probe
        search_threads, self.search_threads = self.search_threads, None
        self.metrics.write(
            "mined",
            step=step,
            take=refresh.take,
            miner=mined.miner,
            scope=self.config.mine_scope,
            seconds=round(mined.search_seconds, 3),
            encode_seconds=round(refresh.encode_seconds, 3),
            wait_seconds=round(waited, 3),
            trainer_threads=search_threads or self.threads.trainer,
            **(probe.as_dict() if probe else {}),
            **mined.report.as_dict(),
        )
        log.info("step %d: %s", step, describe_refresh(refresh, mined, waited, self.config))
        warning = recall_warning(probe, self.config, mined.miner) if probe else None
        if warning:
            log.warning("step %d: %s", step, warning)

    def _evaluate(self, step: int, report: bool = False) -> dict[str, float]:
        """Evaluate on the held-out rows; keep RUN/best/ when the selection metric improves.
        report: log the tower beside the baselines (the first and the last evaluation).
        Only the process that writes run files evaluates (rank 0 under torchrun)."""
        if self.validator is None:
            return self.last_metrics
        self._phase("encode", step)
        metrics, improved = self.validator.evaluate(step, self.backend)
        if improved:
            self._save_best(step, metrics)
        if report:
            for line in self.validator.compare(metrics).table(f"step {step}"):
                log.info("%s", line)
        return metrics

    def _save_best(self, step: int, metrics: dict[str, float]) -> None:
        """Commit the parameters of this evaluation as RUN/best/ (the checkpoint format; no
        optimizer or queue: best/ is for evaluation and export, resume uses checkpoints/)."""
        params = {k: v for k, v in self.backend.state().items() if not k.startswith("opt.")}
        meta = {
            "epoch": self.plan.epoch_of(step),
            "backend": self.backend.name,
            "config_hash": self.config.numeric_hash(),
            "metrics": metrics,
            "select_metric": self.config.select_metric,
        }

        def before_commit() -> None:  # the checkpoint fault point covers this writer too
            self._phase("checkpoint", step)

        save_checkpoint(self.run.root, step, params, meta, 1, before_commit, store=BEST_DIR)
        self.metrics.write("best", step=step, metric=self.config.select_metric, **metrics)

    def _checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        if self.group is not None and not self.writes_run_files:
            self._phase("checkpoint", step)
            self.group.barrier()  # rank 0 commits once every rank got here
            return
        arrays = {**self.backend.state(), **self.queue.state()}
        meta = {
            "epoch": self.plan.epoch_of(step),
            "backend": self.backend.name,
            "miner": self.miner_name,
            "config_hash": self.config.numeric_hash(),
            "mined_table": self.table_path.name if self.table_path else None,
            "metrics": metrics,
            "selection": self.validator.selection.state() if self.validator else None,
        }
        if self.config.hard_negatives and self.mining.in_flight_at(step) is not None:
            assert self.pending is not None, f"no refresh in flight at step {step}"
            self.pending.save_queries(self.run.mined)
            meta["mining"] = self.pending.meta()

        def before_commit() -> None:  # the checkpoint phase point sits inside the writer
            self._phase("checkpoint", step)
            if self.group is not None:  # every rank has finished the step
                self.group.barrier()

        path = save_checkpoint(
            self.run.root, step, arrays, meta, self.config.keep_checkpoints, before_commit
        )
        self.metrics.write("checkpoint", step=step, path=str(path.relative_to(self.run.root)))
        self._prune_mined_tables()

    def _prune_mined_tables(self) -> None:
        """Drop mined tables and saved queries that neither a kept checkpoint nor the run
        itself still uses."""
        keep: set[str | None] = {self.table_path.name} if self.table_path else set()
        if self.pending is not None:
            keep.add(self.pending.queries_name)
        for ckpt in list_checkpoints(self.run.root):
            try:
                meta = json.loads((ckpt / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            keep.add(meta.get("mined_table"))
            keep.add((meta.get("mining") or {}).get("queries"))
        for path in [*self.run.mined.glob("table-*.npy"), *self.run.mined.glob("queries-*.npy")]:
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # --- the run ------------------------------------------------------------------------

    def _restore(self) -> tuple[int, dict[str, float], Selection]:
        """Load the newest verified checkpoint: (step, its metrics, its model selection);
        (0, {}, a fresh selection) when there is none to resume."""
        fresh = Selection(self.config.select_metric)
        if not (self.config.resume and list_checkpoints(self.run.root)):
            return 0, {}, fresh
        try:
            meta, state = load_checkpoint(self.run.root)
        except CheckpointError as error:
            raise UsageError(f"--resume: {error}") from None
        self.backend.load_state(state)
        self.queue.load_state(state)
        if meta.get("mined_table"):
            self.table_path = self.run.mined / meta["mined_table"]
            self.table = HardNegativeTable.load(self.table_path)
        if meta.get("mining"):
            self.pending = load_refresh(meta["mining"], self.run.mined, self.mining)
        step = int(meta["step"])
        log.info(
            "resumed from %s (step %d, made on %s)", step_dir_name(step), step, meta.get("backend")
        )
        selection = Selection.restore(self.config.select_metric, meta.get("selection"))
        return step, dict(meta.get("metrics") or {}), selection

    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt  # a second signal: stop now
            self._stop_signal = signum

        previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, request_stop)
            except ValueError:  # not the main thread: the caller handles signals
                break
        return previous

    def _rank_zero_first(self, make: Callable[[], _T]) -> _T:
        """make() in this process; under torchrun on rank 0 first (it fills shared caches)."""
        return self.group.rank_zero_first(make) if self.group is not None else make()

    def _open_run_files(self, write_config: bool) -> None:
        """Rank 0 (or the only process) prepares the run directory, config.json, log.txt and
        metrics.jsonl; another rank logs warnings to stderr only and keeps its own heartbeat."""
        if self.world is None:
            self.heartbeat = Heartbeat(self.run.heartbeat)
        else:
            self.heartbeat = Heartbeat(self.world.heartbeat_path(self.run.root))
        if self.writes_run_files:
            self.run.prepare()
            if write_config:
                self.run.config.write_text(self.config.to_json())
            open_log(self.run.log)
            tensorboard = self.config.tensorboard
            self.scalars = TensorboardScalars(tensorboard) if tensorboard else None
            self.metrics = MetricsLog(self.run.metrics, also=self.scalars)
        else:
            open_log(Path(os.devnull), echo=False)
            self.scalars = None
            self.metrics = MetricsLog(Path(os.devnull))
        if self.group is not None:
            self.group.barrier()  # the run directory exists for every rank's heartbeat
            assert self.world is not None
            log.info("rank %d of %d joined (%s)", self.world.rank, self.world.size, self.run.root)

    def _open(self) -> tuple[int, int, dict[str, float]]:
        """Check the input, then set the run up: -> (step to start at, total steps, last metrics).

        Nothing is written before the dataset, the run directory and the backend are accepted.
        """
        c = self.config
        if c.tower == "meanpool" and not c.proj:
            raise UsageError(
                "--no-proj is the parameter-free baseline: nothing to train; "
                "evaluate it with `twotower eval --data DIR --tower meanpool --no-proj`"
            )
        if self.world is not None:
            check_config(c, self.world)
            c.resume = c.resume or self.world.restart > 0  # torchrun restarted the group
        enable_crash_dumps()
        if c.tensorboard:
            summary_writer_class()  # refused (exit 2) before anything is written
        if self.world is not None:
            if self._supervisor_pid is not None:
                die_with_parent()  # torchrun ends a stuck rank by killing its guard
            device = backends.resolve(c.backend).removeprefix("torch-")
            ledger = CollectiveLedger(
                ledger_path(self.run.root, self.world.rank), self.world.restart + 1
            )
            self.group = Group(self.world, device, c.collective_timeout, ledger)
        self.dataset = self._rank_zero_first(self._open_dataset)
        self.config = c = c.for_data(self.dataset.context_ids is not None)
        if c.exclude_context:
            self.dataset.seen_ids(np.zeros(0, dtype=np.int64))  # refuses a dataset without ids
        stored = self._check_run_dir()
        self.backend = backends.make_backend(c, self.dataset.dim)
        if self.world is not None:
            self.backend.join_data_parallel(  # type: ignore[attr-defined]
                self.world.rank, self.world.size, self.group.ledger if self.group else None
            )
        split = held_out(c, self.dataset)
        self.train_rows = split.train_rows
        refresh_queries = len(self.train_rows)  # the most one refresh encodes and searches
        if c.mine_scope == "upcoming":
            refresh_queries = min(refresh_queries, c.mine_every * c.batch_size)
        self.miners = MinerSetup(c, self.dataset, refresh_queries, self._miner_event)
        self.threads = self._thread_budget()  # after --miner auto is resolved
        self.miners.make(self.threads.miner)  # options checked against the bank: may refuse
        self._open_run_files(write_config=stored is None)
        self.phases = PhaseReporter(self._beat, log)
        install_progress_sink(self.phases)
        if self.world is not None and not self.world.arms_faults():
            os.environ.pop(faults.ENV_VAR, None)  # nor do this rank's miner workers
        faults.arm(self.run.faults)
        self.phases.enter("load")
        self.miners.log_choice()

        self.plan = StepPlan(self.train_rows, c.batch_size, c.seed)
        total = planned_steps(c, self.plan.batches_per_epoch)
        self.schedule = LRSchedule.of(c, total)
        self.eval_every = self._eval_cadence(split)
        self.queue = MemoryQueue(c.queue_size, self.dataset.dim)
        self.table = HardNegativeTable.empty(self.dataset.num_samples, c.mine_pool)
        self.mining = MiningSchedule.of(c, self.plan)
        step, metrics, selection = self._restore()
        mirror = getattr(self.backend, "queue_mirror", None)  # the ring on the backend's device
        self.queue.attach(mirror(self.queue.ids, self.queue.vecs) if mirror else None)
        faults.set_step(step)
        self.phases.enter("build-index")  # a worker's load-index or build-index refines it
        self._rank_zero_first(self.miners.build)  # rank 0 fills the index cache first
        self.miner = self.miners.miner
        if self.writes_run_files:  # ranks other than 0 do not evaluate
            eval_miner = (
                self.miners.eval_miner
                if split.eval_dataset is self.dataset
                else self._make_eval_miner(split.eval_dataset)
            )
            self.validator = Validator(c, split, eval_miner, self.metrics, selection)
            log.info("%s", split.describe())
        pools = limit_threads(self.threads.trainer)  # after the engines have loaded theirs
        self.heartbeat.describe(threads=self.threads.as_dict(), threadpools=pools)

        self.probe_miner = self._make_probe_miner() if c.hard_negatives else None
        if self.pending is not None:
            self._submit(self.pending)  # in flight at the checkpoint: searched again
        self.openmp = openmp_runtimes()
        log.info("threads: %s", self.threads.describe())
        self._phase("load", step)
        if c.lr_schedule != "constant" or self.schedule.warmup:
            log.info(
                "lr %g, %d warm-up steps, then %s over %d steps",
                c.lr,
                self.schedule.warmup,
                c.lr_schedule,
                total,
            )
        self.metrics.write(
            "start",
            step=step,
            total_steps=total,
            backend=self.backend.name,
            miner=self.miner_name,
            miner_build=dict(getattr(self.miner, "build_info", {})),
            samples=self.dataset.num_samples,
            train=len(self.train_rows),
            eval=len(split.eval_rows),
            split=split.kind,
            eval_every=self.eval_every,
            lr_schedule=c.lr_schedule,
            warmup_steps=self.schedule.warmup,
            pid=os.getpid(),
        )
        return step, total, metrics

    def _eval_cadence(self, split: HeldOut) -> int:
        """--eval-every, or the automatic cadence (cadence.py), logged either way."""
        c = self.config
        if c.eval_every is not None:
            every = c.eval_every
            how = "as --eval-every says" if every else "only at the start and the end"
        else:
            every = auto_eval_every(
                c,
                self.dataset.dim,
                self.dataset.seq_len,
                len(split.eval_rows),
                split.eval_dataset.bank_size,
                self.plan.batches_per_epoch,
            )
            how = (
                f"auto: about {EVAL_BUDGET:.0%} of the training compute, "
                f"at most {EVALS_PER_EPOCH} times an epoch"
            )
        if every:
            log.info("evaluating every %d steps (%s)", every, how)
        return every

    def _loop(
        self, step: int, total: int, metrics: dict[str, float]
    ) -> tuple[int, dict[str, float]]:
        """Train from `step` to `total`: mine, step, evaluate and checkpoint when due; a final
        evaluation and checkpoint. Raises StopRequested after a SIGINT/SIGTERM."""
        c = self.config
        plan = self.plan if self.world is None else ShardPlan(self.plan, self.world)
        prefetch = Prefetcher(self.dataset, plan, bool(c.exclude_context))
        progress = tqdm(
            total=total,
            initial=step,
            desc="train",
            unit="step",
            disable=False if os.environ.get(PROGRESS_ENV) == "1" else None,
            dynamic_ncols=True,
        )
        try:
            while step < total:
                if c.hard_negatives:
                    self._take_refresh(step)
                    if self.mining.is_use(step):
                        self._use_refresh(step)
                stats = self._train_step(step, prefetch.get(step))
                step += 1
                self.steps_done = step
                progress.update(1)
                recall = f"{metrics.get('recall@10', 0):.3f}"
                progress.set_postfix(loss=f"{stats.loss:.4f}", **{"R@10": recall})
                if self.eval_every and step % self.eval_every == 0 and step < total:
                    metrics = self._evaluate(step)
                    self.stopped_early = self._patience_exhausted()
                self.last_metrics = metrics
                if self._stop_requested():
                    raise StopRequested
                if self.stopped_early:
                    break
                if step % c.checkpoint_every == 0 and step < total:
                    self._checkpoint(step, metrics)
        finally:
            progress.close()  # the final lines print below the finished bar
            prefetch.close()
            if self.job is not None:  # the checkpoints keep its queries; a resume redoes it
                self.job.abandon()
                self._share_cores(False)
        if self.stopped_early:
            self._report_early_stop(step, metrics)
        else:
            metrics = self._evaluate(step, report=True)
        self._checkpoint(step, metrics)
        self.metrics.write("done", step=step, **metrics)
        return step, metrics

    def _patience_exhausted(self) -> bool:
        """Whether --patience evaluations in a row have not improved the selection metric.
        Under torchrun rank 0 alone evaluates: its answer reaches every rank, so all stop
        after the same step."""
        c = self.config
        exhausted = bool(self.validator and self.validator.selection.exhausted(c.patience))
        if self.group is not None and c.patience:
            return self.group.any(exhausted)
        return exhausted

    def _report_early_stop(self, step: int, metrics: dict[str, float]) -> None:
        """Log and record the early stop at `step` (the evaluating process only)."""
        if self.validator is None:
            return
        c = self.config
        selection = self.validator.selection
        self.metrics.write(
            "early-stop", step=step, best_step=selection.best_step, patience=c.patience
        )
        log.info(
            "step %d: stopping early: %s has not improved in %d evaluations (best %.4f at step %s)",
            step,
            c.select_metric,
            c.patience,
            selection.best_value,
            selection.best_step,
        )
        for line in self.validator.compare(metrics).table(f"step {step}"):
            log.info("%s", line)

    def _stop_requested(self) -> bool:
        """A stop signal arrived here (or, under torchrun, on any rank: all stop at one step)."""
        asked = self._stop_signal is not None
        return self.group.any(asked) if self.group is not None else asked

    def run_training(self) -> RunResult:
        try:
            return self._run_training()
        finally:
            if hasattr(self, "phases"):
                install_progress_sink(None)
                self.phases.close()

    def _run_training(self) -> RunResult:
        step, total, metrics = self._open()
        started = time.perf_counter()
        metrics_before = self._evaluate(0, report=True) if step == 0 else {}
        self.steps_done, self.last_metrics = step, metrics_before or metrics
        previous_handlers = self._install_signal_handlers()
        exit_code = EXIT_OK
        try:
            step, metrics = self._loop(step, total, self.last_metrics)
        except StopRequested:
            step, metrics = self.steps_done, self.last_metrics
            self._checkpoint(step, metrics)
            name = signal.Signals(self._stop_signal or signal.SIGINT).name
            self.metrics.write("interrupted", step=step, signal=name)
            log.warning("%s: checkpoint written at step %d; resume with --resume", name, step)
            exit_code = EXIT_INTERRUPTED
        except KeyboardInterrupt:  # a second signal, maybe mid-update: no checkpoint of that
            step, metrics = self.steps_done, self.last_metrics
            self.metrics.write("interrupted", step=step, signal="SIGINT", checkpoint=False)
            log.warning("stopped at once: resume with --resume from the newest checkpoint")
            exit_code = EXIT_INTERRUPTED
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if self.scalars is not None:
                self.scalars.close()
            if self.group is not None:
                self.group.close()
        if metrics_before:
            log.info(
                "recall@10 before: %.4f, after: %.4f (%d steps)",
                metrics_before.get("recall@10", 0.0),
                metrics.get("recall@10", 0.0),
                step,
            )
        best = self._report_best_and_cost(time.perf_counter() - started)
        return RunResult(
            run_dir=self.run.root,
            exit_code=exit_code,
            steps=step,
            backend=self.backend.name,
            miner=self.miner_name,
            metrics=metrics,
            metrics_before=metrics_before,
            best_step=best[0],
            best_metrics=best[1],
            stopped_early=self.stopped_early,
        )

    def _report_best_and_cost(self, seconds: float) -> tuple[int | None, dict[str, float]]:
        """Log where best/ stands and the share of this attempt's time spent evaluating;
        returns (best step, its metrics) as best/ records them."""
        v = self.validator
        if v is None:
            return None, {}
        share = v.seconds / seconds if seconds > 0 else 0.0
        self.metrics.write(
            "eval-cost", evaluations=v.count, seconds=round(v.seconds, 3), share=round(share, 4)
        )
        log.info(
            "evaluation: %d evaluations took %.1f s, %.1f%% of this attempt's %.1f s",
            v.count,
            v.seconds,
            100 * share,
            seconds,
        )
        if v.selection.best_step is None:
            return None, {}
        try:
            meta, _ = load_checkpoint(self.run.root, which="best")
        except CheckpointError:
            return None, {}
        log.info(
            "best: %s %.4f at step %d, in %s",
            self.config.select_metric,
            meta["metrics"][self.config.select_metric],
            meta["step"],
            self.run.root / BEST_DIR,
        )
        return int(meta["step"]), dict(meta["metrics"])

    def _train_step(self, step: int, data: StepData) -> StepStats:
        first_row = 0
        if self.group is not None:  # this rank's rows, the global batch's positives
            faults.set_step(step)  # its ledger counts these gathers as this step's
            data = self.group.gather_positives(data, self.plan.rows_for(step))
            first_row = self.group.world.shard(self.config.batch_size).start
        batch = assemble_batch(
            data,
            self.table,
            self.queue,
            self.dataset.bank,
            self.config.hard_negatives,
            self.config.seed,
            first_row,
        )
        lr = self.schedule.at(step)
        if self._phase("step", step):
            batch.contexts = batch.contexts.copy()
            batch.contexts[:, 0] = np.nan  # injected 'nan' fault: the loss is poisoned
        started = time.perf_counter()
        stats = self.backend.step(batch, lr)
        elapsed = time.perf_counter() - started
        self.queue.push(data.positive_ids, data.positive_vecs)
        record: dict[str, Any] = dict(
            step=step + 1,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            lr=lr,
            batch=data.digest,
            ms=round(elapsed * 1e3, 2),
            rss_kb=self.rss_kb,
        )
        if self.group is not None:  # all-gather of positives + all-reduce of gradients
            seconds = self.group.take_seconds() + self.backend.data_parallel.take_seconds()  # type: ignore[attr-defined]
            record["collective_ms"] = round(seconds * 1e3, 2)
        if not stats.applied:
            self.metrics.write("nonfinite", **record)
            log.warning(
                "step %d: non-finite loss or gradient (loss %s); update skipped",
                step + 1,
                stats.loss,
            )
        else:
            self.metrics.write("step", **record)
        return stats


def train(config: TrainConfig, on_worker_death: WorkerDeathReporter | None = None) -> RunResult:
    """Train in this process. Raises UsageError for bad input before anything is written.

    on_worker_death(RUN/crashes, event) writes a dead miner worker's crash report and
    returns its path (`twotower.train` passes guard's; None: the death is only logged).
    """
    return Trainer(config, on_worker_death).run_training()

"""The backend-agnostic training loop: batches -> negatives -> step -> checkpoint.

`train(config)` runs in this process. Everything a step depends on follows
from the checkpoint (parameters, optimizer, queue, mined table) and the step
number (batch rows, sampled hard negatives), so a resumed run continues bit
for bit where the interrupted one would have gone, on the same backend.
The run is set up by `setup.open_run`, its refreshes are `refresher.Refresher`'s, and each
step is `step.prepare` + `step.update` (the code `twotower replay` rebuilds steps with).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from twotower.batch import StepStats
from twotower.config import TrainConfig
from twotower.errors import EXIT_INTERRUPTED, EXIT_OK
from twotower.process.phase import Phase
from twotower.run.disk import stops_on_full_disk
from twotower.run.records import CheckpointMeta
from twotower.run.rundir import read_metrics
from twotower.training import step as one_step
from twotower.training.batching import Prefetcher, StepData
from twotower.training.checkpoint import BEST_DIR, CheckpointError, load_record, save_checkpoint
from twotower.training.setup import OpenedRun, WorkerDeathReporter, open_run

log = logging.getLogger("twotower")

PROGRESS_ENV = "TWOTOWER_PROGRESS"  # "1": show the progress bar even when stderr is a pipe
STALL_BEAT_EVERY = 50  # steps between heartbeat updates of the stall watch's reading


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
    """The loop over an opened run (see `train`): steps, evaluations, checkpoints, the end.

    run: what `setup.open_run` returned. steps_done and last_metrics are what a stop request
    checkpoints; stopped_early: --patience ended the run.
    """

    def __init__(self, run: OpenedRun):
        self.run = run
        self.config = run.state.config
        self.steps_done = 0
        self.last_metrics: dict[str, float] = {}
        self.stopped_early = False

    # --- evaluations and checkpoints ---------------------------------------------------------

    def _evaluate(self, step: int, report: bool = False, select: bool = True) -> dict[str, float]:
        """Evaluate on the held-out rows; keep RUN/best/ when the selection metric improves.
        report: log the tower beside the baselines (the first and the last evaluation);
        select=False: one off the cadence, which model selection never sees (Validator).
        Only the process that writes run files evaluates (rank 0 under torchrun)."""
        validator = self.run.validator
        if validator is None:
            return self.last_metrics
        self.run.points.enter(Phase.ENCODE, step)
        self.run.threads.to(stepping=False)  # every core: a step's small GEMMs are not here
        metrics, improved = validator.evaluate(step, self.run.state.backend, select)
        if improved:
            self._save_best(step, metrics)
        if report:
            for line in validator.compare(metrics).table(f"step {step}"):
                log.info("%s", line)
        return metrics

    def _save_best(self, step: int, metrics: dict[str, float]) -> None:
        """Commit the parameters of this evaluation as RUN/best/ (the checkpoint format; no
        optimizer or queue: best/ is for evaluation and export, resume uses checkpoints/)."""
        backend = self.run.state.backend
        params = {k: v for k, v in backend.state().items() if not k.startswith("opt.")}
        meta = {
            "epoch": self.run.state.plan.epoch_of(step),
            "backend": backend.name,
            "config_hash": self.config.numeric_hash(),
            "metrics": metrics,
            "select_metric": self.config.select_metric,
        }

        def before_commit() -> None:  # the checkpoint fault point covers this writer too
            self.run.points.enter(Phase.CHECKPOINT, step)

        save_checkpoint(self.run.run.root, step, params, meta, 1, before_commit, store=BEST_DIR)
        self.run.metrics.write("best", step=step, metric=self.config.select_metric, **metrics)

    def _checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """Write checkpoint `step` (rank 0 commits once every rank has finished the step),
        then prune the mined tables no checkpoint needs."""
        run, group, state = self.run, self.run.group, self.run.state
        if not group.writes_run_files:
            run.points.enter(Phase.CHECKPOINT, step)
            group.barrier()  # rank 0 commits once every rank got here
            return
        arrays = {**state.backend.state(), **state.queue.state()}
        meta = CheckpointMeta(
            step,
            epoch=state.plan.epoch_of(step),
            backend=state.backend.name,
            miner=run.points.miner_name,
            config_hash=self.config.numeric_hash(),
            mined_table=run.refresher.table_name,
            search_params=run.refresher.search_params,
            metrics=metrics,
            selection=run.validator.selection.state() if run.validator else None,
            mining=run.refresher.in_flight(step),
        )

        def before_commit() -> None:  # the checkpoint phase point sits inside the writer
            run.points.enter(Phase.CHECKPOINT, step)
            group.barrier()  # every rank has finished the step

        path = save_checkpoint(
            run.run.root,
            step,
            arrays,
            meta.caller_fields(),
            self.config.keep_checkpoints,
            before_commit,
        )
        run.metrics.write("checkpoint", step=step, path=str(path.relative_to(run.run.root)))
        run.refresher.prune()

    # --- the loop ------------------------------------------------------------------------------

    def _loop(
        self, step: int, total: int, metrics: dict[str, float]
    ) -> tuple[int, dict[str, float]]:
        """Train from `step` to `total`: mine, step, evaluate and checkpoint when due; a final
        evaluation and checkpoint. Raises StopRequested after a SIGINT/SIGTERM."""
        c, run = self.config, self.run
        prefetch = Prefetcher(run.dataset, run.group.rows(run.state.plan), bool(c.exclude_context))
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
                stats = self._train_step(step, prefetch.get(step))
                step += 1
                self.steps_done = step
                progress.update(1)
                recall = f"{metrics.get('recall@10', 0):.3f}"
                progress.set_postfix(loss=f"{stats.loss:.4f}", **{"R@10": recall})
                if run.eval_every and step % run.eval_every == 0 and step < total:
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
            run.refresher.abandon()  # the checkpoints keep its queries; a resume redoes it
        if self.stopped_early:
            self._report_early_stop(step, metrics)
        else:
            metrics = self._evaluate(step, report=True)
        self._checkpoint(step, metrics)
        run.metrics.write("done", step=step, **metrics)
        return step, metrics

    def _train_step(self, step: int, data: StepData) -> StepStats:
        """Step `step` (`step.prepare` + `step.update`), recorded in metrics.jsonl."""
        run = self.run
        run.threads.to(stepping=True)  # a refresh taken in prepare encodes on these too
        prepared = one_step.prepare(step, data, run.state, run.refresher, run.group)
        poison = run.points.enter(Phase.STEP, step)  # injected 'nan' fault: the loss is poisoned
        updated = one_step.update(step, prepared, run.state, poison)
        self._watch_stalls(step + 1, updated.seconds)
        stats = updated.stats
        record: dict[str, Any] = dict(
            step=step + 1,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            lr=updated.lr,
            batch=prepared.data.digest,
            ms=round(updated.seconds * 1e3, 2),
            threads=run.threads.threads,  # after prepare: a refresh taken may share cores
            rss_kb=run.points.rss_kb,
            **run.group.collective_fields(run.state.backend),
        )
        if not stats.applied:
            run.metrics.write("nonfinite", **record)
            log.warning(
                "step %d: non-finite loss or gradient (loss %s); update skipped",
                step + 1,
                stats.loss,
            )
        else:
            run.metrics.write("step", **record)
        return stats

    def _watch_stalls(self, step: int, seconds: float) -> None:
        """Feed the step's time to the stall watch (`process.stalls`); when it names the machine
        oversubscribed (or no longer), say so in the log and metrics; its last reading goes
        into the heartbeat."""
        stalls = self.run.stalls
        line = stalls.step(seconds)
        if stalls.contention is not None and (line or step % STALL_BEAT_EVERY == 0):
            self.run.points.heartbeat.describe(contention=stalls.as_dict())
        if line:
            self.run.metrics.write("contention", step=step, **stalls.as_dict())
            log.warning("step %d: %s", step, line)

    def _patience_exhausted(self) -> bool:
        """Whether --patience evaluations in a row have not improved the selection metric.
        Under torchrun rank 0 alone evaluates: its answer reaches every rank, so all stop
        after the same step."""
        c, validator = self.config, self.run.validator
        exhausted = bool(validator and validator.selection.exhausted(c.patience))
        return self.run.group.any(exhausted) if c.patience else exhausted

    def _report_early_stop(self, step: int, metrics: dict[str, float]) -> None:
        """Log and record the early stop at `step` (the evaluating process only)."""
        validator = self.run.validator
        if validator is None:
            return
        c = self.config
        selection = validator.selection
        self.run.metrics.write(
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
        for line in validator.compare(metrics).table(f"step {step}"):
            log.info("%s", line)

    def _stop_requested(self) -> bool:
        """A stop signal arrived here (or, under torchrun, on any rank: all stop at one step)."""
        return self.run.group.any(self.run.points.stop_signal is not None)

    # --- the run -------------------------------------------------------------------------------

    def train(self) -> RunResult:
        """Evaluate before a fresh run, train to the planned steps (or a stop), report."""
        run = self.run
        step, total, metrics = run.start, run.state.schedule.total, run.metrics_at_start
        started = time.perf_counter()
        metrics_before = self._evaluate(0, report=True) if step == 0 else {}
        self.steps_done, self.last_metrics = step, metrics_before or metrics
        exit_code = EXIT_OK
        try:
            with run.points.stop_signals():
                try:
                    step, metrics = self._loop(step, total, self.last_metrics)
                except StopRequested:
                    step, metrics = self.steps_done, self.last_metrics
                    self._checkpoint(step, metrics)
                    name = signal.Signals(run.points.stop_signal or signal.SIGINT).name
                    run.metrics.write("interrupted", step=step, signal=name)
                    log.warning("%s: checkpoint written at step %d", name, step)
                    exit_code = EXIT_INTERRUPTED
                    metrics = self._evaluate_stop(step, metrics)
                except KeyboardInterrupt:  # a second signal, maybe mid-update: no checkpoint
                    step, metrics = self.steps_done, self.last_metrics
                    run.metrics.write("interrupted", step=step, signal="SIGINT", checkpoint=False)
                    log.warning("stopped at once, without a checkpoint of step %d", step)
                    exit_code = EXIT_INTERRUPTED
        finally:
            if run.scalars is not None:
                run.scalars.close()
            run.group.close()
        self._summarize(metrics_before, metrics)
        best = self._report_best_and_cost(time.perf_counter() - started)
        if exit_code == EXIT_INTERRUPTED:  # the last line: the command that goes on from here
            command = f"twotower train --out {shlex.quote(str(self.config.out))} --resume"
            log.warning("resume with: %s", command)
        return RunResult(
            run_dir=run.run.root,
            exit_code=exit_code,
            steps=step,
            backend=run.state.backend.name,
            miner=run.points.miner_name,
            metrics=metrics,
            metrics_before=metrics_before,
            best_step=best[0],
            best_metrics=best[1],
            stopped_early=self.stopped_early,
        )

    def _evaluate_stop(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """After a stop request: an evaluation at `step` for the summary, unless the newest
        one is at `step`; model selection never sees it, so the resumed run selects as the
        uninterrupted one. A second signal skips it (the checkpoint is written)."""
        validator = self.run.validator
        if validator is None or validator.last_step == step:
            return metrics
        try:
            return self._evaluate(step, report=True, select=False)
        except KeyboardInterrupt:
            return metrics

    def _summarize(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Log recall@10 at step 0 and at the newest evaluation, naming both steps. A resumed
        run reads its step-0 evaluation from metrics.jsonl."""
        v = self.run.validator
        if v is None or v.last_step is None:
            return
        if not before:
            at_start = (
                r
                for r in read_metrics(self.run.run.metrics)
                if r["event"] == "eval" and r["step"] == 0
            )
            before = next(at_start, {})
        if "recall@10" in before and "recall@10" in after:
            log.info(
                "recall@10 at step 0: %.4f, at step %d: %.4f",
                before["recall@10"],
                v.last_step,
                after["recall@10"],
            )

    def _report_best_and_cost(self, seconds: float) -> tuple[int | None, dict[str, float]]:
        """Log where best/ stands and the share of this attempt's time spent evaluating;
        returns (best step, its metrics) as best/ records them."""
        v = self.run.validator
        if v is None:
            return None, {}
        share = v.seconds / seconds if seconds > 0 else 0.0
        self.run.metrics.write(
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
        root = self.run.run.root
        try:
            meta, _ = load_record(root, which="best")
        except CheckpointError:
            return None, {}
        log.info(
            "best: %s %.4f at step %d, in %s",
            self.config.select_metric,
            meta.metrics[self.config.select_metric],
            meta.step,
            root / BEST_DIR,
        )
        return meta.step, dict(meta.metrics)


def train(config: TrainConfig, on_worker_death: WorkerDeathReporter | None = None) -> RunResult:
    """Train in this process. Raises UsageError for bad input before anything is written,
    DiskFull (exit code 4) when a write of the run fails for want of space.

    on_worker_death(RUN/crashes, event) writes a dead miner worker's crash report and
    returns its path (`twotower.train` passes guard's; None: the death is only logged).
    """
    with stops_on_full_disk(config.out):
        opened = open_run(config, on_worker_death)
        try:
            return Trainer(opened).train()
        finally:
            opened.close()

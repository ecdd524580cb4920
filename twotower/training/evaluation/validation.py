"""A run's evaluations on its held-out rows: the tower's metrics, the baselines beside them
(computed once: they have no parameters), model selection, and the time it all costs."""

from __future__ import annotations

import logging
import time

from twotower.backends import Backend
from twotower.config import TrainConfig
from twotower.miners import Miner
from twotower.run.rundir import BASELINES_EVENT, MetricsLog
from twotower.training.evaluation.heldout import HeldOut
from twotower.training.evaluation.metrics import Comparison, evaluate, evaluate_baselines
from twotower.training.evaluation.selection import Selection

log = logging.getLogger("twotower")


class Validator:
    """Evaluates a backend's tower on `split`'s held-out rows with `miner` (built over the
    held-out rows' bank), logs each evaluation to `metrics`, and tracks `selection`.

    seconds: wall time spent evaluating (baselines included); count: evaluations made;
    last_step: the step of the newest evaluation (None: none yet in this process).
    """

    def __init__(
        self,
        config: TrainConfig,
        split: HeldOut,
        miner: Miner,
        metrics: MetricsLog,
        selection: Selection,
    ):
        self.config = config
        self.split = split
        self.miner = miner
        self.metrics = metrics
        self.selection = selection
        self.seconds = 0.0
        self.count = 0
        self.last_step: int | None = None
        self._baselines: dict[str, dict[str, float]] | None = None

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        """{baseline name: metrics} on the held-out rows (computed and logged on first use)."""
        if self._baselines is None:
            started = time.perf_counter()
            self._baselines = evaluate_baselines(
                self.split.eval_dataset, self.split.eval_rows, self.miner, self.masking
            )
            self.seconds += time.perf_counter() - started
            self.metrics.write(
                BASELINES_EVENT, queries=len(self.split.eval_rows), **self._baselines
            )
        return self._baselines

    @property
    def masking(self) -> bool:
        """Whether the ranking drops each query's own context items (--exclude-context)."""
        return bool(self.config.exclude_context)

    def evaluate(
        self, step: int, backend: Backend, select: bool = True
    ) -> tuple[dict[str, float], bool]:
        """(metrics, improved): the tower now, and whether it beats every earlier evaluation
        on the selection metric. Logged as an "eval" record with its seconds and lift.

        select=False: an evaluation off the run's cadence (the summary of an interrupted
        run) that model selection never sees (improved is False), so best/ and --patience
        go on as the uninterrupted run's; its record says "selected": false."""
        started = time.perf_counter()
        metrics = evaluate(
            backend, self.split.eval_dataset, self.split.eval_rows, self.miner, self.masking
        )
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.count += 1
        self.last_step = step
        improved = self.selection.update(step, metrics) if select else False
        comparison = self.compare(metrics)
        self.metrics.write(
            "eval",
            step=step,
            queries=len(self.split.eval_rows),
            seconds=round(seconds, 3),
            best=improved,
            lift=round(comparison.lift, 4),
            **({} if select else {"selected": False}),
            **metrics,
        )
        log.info(
            "step %d: %s (lift %s over %s)%s",
            step,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            comparison.lift_text(),
            comparison.best_baseline,
            ", best so far" if improved else "" if select else ", off the cadence (not selected)",
        )
        return metrics, improved

    def compare(self, metrics: dict[str, float]) -> Comparison:
        """The tower's `metrics` beside the baselines, lift on the selection metric."""
        return Comparison(metrics, self.baselines, self.config.select_metric)

"""A run's hard-negative refreshes from take to prune: encode the queries at the take step,
search them (beside training or at once), share the cores meanwhile, put the table into use,
probe its recall, record what a checkpoint needs, and drop tables no checkpoint needs.

The schedule, the rows and the search itself are `refresh.py`'s; this class holds the one
refresh in flight and the table in use.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from twotower import miners
from twotower.backends import Backend
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.process.phase import Phase
from twotower.process.threads import ThreadSwitch
from twotower.run.records import CheckpointMeta
from twotower.run.rundir import MetricsLog, RunDir
from twotower.training.checkpoint import list_checkpoints, step_dir_name
from twotower.training.evaluation.metrics import encode_rows
from twotower.training.negatives.miner_setup import MinerSetup
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.refresh import (
    Mined,
    MiningJob,
    MiningSchedule,
    Refresh,
    describe_refresh,
    is_approximate,
    recall_warning,
)
from twotower.training.phase_points import PhasePoints
from twotower.training.ranks.solo import RunGroup

log = logging.getLogger("twotower")


def mines_beside_training(config: TrainConfig, miner: str, group: RunGroup) -> bool:
    """Whether a refresh is searched in a thread beside training: --mine-overlap, else
    when the miner has its own process (it competes least with training there); never
    under torchrun, whose ranks' collectives must stay in one order."""
    if not group.searches_beside_training:
        return False
    if config.mine_overlap is not None:
        return config.mine_overlap
    return miners.isolation_of(miner, config.miner_isolation) != "none"


def make_probe_miner(config: TrainConfig, dataset: Dataset) -> miners.Miner | None:
    """The exact miner the recall probe compares with; None when no miner of the chain
    is approximate or the probe is off."""
    chain = [config.miner, *config.miner_fallback]
    if not config.mine_probe or not any(is_approximate(n, config.faiss_index) for n in chain):
        return None
    exact = miners.get("exact", isolation="none", fault_phase=None)
    exact.build(dataset.bank, fingerprint=dataset.fingerprint)
    return exact


class Refresher:
    """The refreshes of one run (`step.Refreshes` for the trainer).

    miner_setup: the run's miners; its mining chain (None without hard negatives) searches,
    and a probe below --faiss-target-recall raises its search parameters; probe: the exact
    miner of the recall probe (None: no probe); table_path: the mined table in use (None:
    none yet);
    pending: the refresh in flight a checkpoint recorded (searched again by `resume`).
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        backend: Backend,
        mining: MiningSchedule,
        group: RunGroup,
        run: RunDir,
        metrics: MetricsLog,
        points: PhasePoints,
        threads: ThreadSwitch,
        miner_setup: MinerSetup,
        probe: miners.Miner | None,
        table_path: Path | None,
        pending: Refresh | None,
    ):
        self.config = config
        self.dataset = dataset
        self.backend = backend
        self.mining = mining
        self.group = group
        self.run = run
        self.metrics = metrics
        self.points = points
        self.threads = threads  # the trainer's: shared while its worker searches
        self.miner_setup = miner_setup  # raises the search parameters a probe finds short
        self.miner = miner_setup.miner
        self.probe = probe
        self.table_path = table_path
        self.pending = pending  # the refresh taken and not yet in use
        self.job: MiningJob | None = None  # its search

    def resume(self) -> None:
        """Search again the refresh a checkpoint recorded in flight (if it did)."""
        if self.pending is not None:
            self._submit(self.pending)

    def take(self, step: int) -> None:
        """If a refresh is taken at `step`: encode its rows now and hand them to the miner."""
        use = self.mining.use_taken_at(step)
        if use is None:
            return
        self.points.enter(Phase.ENCODE, step)
        rows = self.mining.rows(use)
        started = time.perf_counter()
        queries = encode_rows(self.backend, self.dataset.gather, rows, label="mine: encode")
        self._submit(Refresh(step, use, rows, queries, time.perf_counter() - started))

    def _submit(self, refresh: Refresh) -> None:
        """Start the search of `refresh`: beside training, or now in this thread."""
        assert self.miner is not None, "mining needs --hard-negatives > 0"
        self.pending = refresh
        background = mines_beside_training(self.config, self.miner.name, self.group)
        if not background:  # a crash of an in-process miner is blamed on the mine phase
            self.points.enter(Phase.MINE, refresh.take)
        else:
            self._share_cores(True)
        self.job = MiningJob(refresh, self._search, self.miner, background)

    def _search(self, refresh: Refresh, miner: miners.Miner) -> Mined:
        return self.group.mine_refresh(refresh, miner, self.probe, self.dataset, self.config)

    def _share_cores(self, searching: bool) -> None:
        """Limit the trainer to its share of the cores from the step a refresh is taken (its
        worker searches) to the step it is used or abandoned, or give it its whole budget
        again. The switches follow from the config, not from when the search ends: torch's
        results depend on the thread count in their last bits, and a rerun or a resumed run
        must compute every step on the same count."""
        self.threads.to(searching=searching)

    def use(self, step: int) -> HardNegativeTable:
        """The table of the refresh used at `step`, waiting for its search if it still runs;
        saved (by the process that writes run files) and recorded as a `mined` event."""
        assert self.job is not None and self.pending is not None and self.pending.use == step
        self.points.enter(Phase.MINE, step)
        # the trainer's threads for the steps the search ran beside (its share, or all)
        search_threads = self.threads.budget.count(stepping=True, searching=self.threads.searching)
        try:
            mined, waited = self.job.result()
        finally:
            self._share_cores(False)
        refresh = self.pending
        self.table_path = self.run.mined / f"table-{step_dir_name(step)}.npy"
        if self.group.writes_run_files:
            mined.table.save(self.table_path)
        self.job = self.pending = None
        probe = mined.probe
        raised = self.miner_setup.raise_after_probe(probe.recall) if probe else {}
        self.metrics.write(
            "mined",
            step=step,
            take=refresh.take,
            miner=mined.miner,
            scope=self.config.mine_scope,
            seconds=round(mined.search_seconds, 3),
            encode_seconds=round(refresh.encode_seconds, 3),
            wait_seconds=round(waited, 3),
            trainer_threads=search_threads,
            **(probe.as_dict() if probe else {}),
            **({"raised": raised} if raised else {}),
            **mined.report.as_dict(),
        )
        log.info("step %d: %s", step, describe_refresh(refresh, mined, waited, self.config))
        warning = recall_warning(probe, self.config, mined.miner) if probe else None
        if warning:
            log.warning("step %d: %s", step, warning)
        if raised:
            log.info(
                "step %d: recall below --faiss-target-recall %g: the next refreshes search with %s",
                step,
                self.config.faiss_target_recall,
                ", ".join(f"{name} {value}" for name, value in raised.items()),
            )
        return mined.table

    def abandon(self) -> None:
        """Stop a search in flight (the checkpoints keep its queries; a resume redoes it)."""
        if self.job is not None:
            self.job.abandon()
            self._share_cores(False)

    @property
    def search_params(self) -> dict[str, int]:
        """The mining miner's search parameters as probes raised them (a checkpoint's
        `search_params`; {}: as tuned after the build)."""
        return self.miner_setup.search_params

    @property
    def table_name(self) -> str | None:
        """The file name of the mined table in use (a checkpoint's `mined_table`)."""
        return self.table_path.name if self.table_path else None

    def in_flight(self, step: int) -> dict[str, Any] | None:
        """What a checkpoint at `step` records as its `mining`: the refresh taken and not yet
        in use (its queries saved once), or None."""
        if not self.config.hard_negatives or self.mining.in_flight_at(step) is None:
            return None
        assert self.pending is not None, f"no refresh in flight at step {step}"
        self.pending.save_queries(self.run.mined)
        return self.pending.meta()

    def prune(self) -> None:
        """Drop mined tables and saved queries that neither a kept checkpoint nor the run
        itself still uses."""
        keep: set[str | None] = {self.table_name} if self.table_path else set()
        if self.pending is not None:
            keep.add(self.pending.queries_name)
        for ckpt in list_checkpoints(self.run.root):
            try:
                meta = CheckpointMeta.read(ckpt)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            keep.add(meta.mined_table)
            keep.add((meta.mining or {}).get("queries"))
        mined = self.run.mined
        for path in [*mined.glob("table-*.npy"), *mined.glob("queries-*.npy")]:
            if path.name not in keep:
                path.unlink(missing_ok=True)

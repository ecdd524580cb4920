"""Data-parallel training under torchrun: the world, its process group, and what ranks exchange.

`torchrun --nproc-per-node W -m twotower train ...` starts W ranks; each trains
the same model on its share of every step (docs/DESIGN.md, "Distributed"):

- the global batch of step s is the 1-process batch (same `StepPlan`); rank r
  takes rows [r * B / W, (r + 1) * B / W) (`ShardPlan`), B must divide by W;
- the ranks all-gather their positives, so in-batch negatives are the global
  batch's positives in global order and the queue, pushed with them, is the
  same on every rank (`Group.gather_positives`);
- gradients and loss are summed by the torch engine (`backends.torch_data_parallel`);
- mining: each rank encodes and mines its share of the training rows with its
  own miner (its own worker process where the miner is isolated) and the
  table is assembled from every share (`Group.mine`);
- rank 0 alone writes run files; a checkpoint commits only after a barrier
  that every rank reaches once it has finished the step.

gloo on the CPU, nccl on CUDA; the group's timeout (--collective-timeout)
turns a rank hung in a collective into an error on the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np

from twotower.backends import Backend
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.errors import UsageError
from twotower.miners.base import Miner
from twotower.process import faults
from twotower.process.collective_ledger import CollectiveLedger, counted
from twotower.run.rundir import RunDir
from twotower.training.batching import StepData, StepPlan
from twotower.training.negatives.mining import HardNegativeTable, MiningReport, mine_table
from twotower.training.negatives.refresh import Mined, Refresh

WORLD_SIZE_ENV = "WORLD_SIZE"
RANK_ENV = "RANK"
LOCAL_RANK_ENV = "LOCAL_RANK"
LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
MASTER_ADDR_ENV = "MASTER_ADDR"
MASTER_PORT_ENV = "MASTER_PORT"
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
FAULT_RANK_ENV = "TWOTOWER_FAULT_RANK"  # rehearsals: arm TWOTOWER_INJECT_FAULT on this rank only
_T = TypeVar("_T")
log = logging.getLogger("twotower")


@dataclass(frozen=True)
class World:
    """Where this process stands in a torchrun launch.

    rank: 0..size-1; local_rank: its index on this machine (its GPU); local_size: the
    ranks on this machine (they share its cores); restart: how many times torchrun has
    restarted the group before this one (0 first).
    """

    rank: int
    size: int
    local_rank: int = 0
    local_size: int = 1
    restart: int = 0

    @property
    def writes_run_files(self) -> bool:
        """Rank 0 alone writes config.json, metrics.jsonl, log.txt, checkpoints, mined tables."""
        return self.rank == 0

    def heartbeat_path(self, run_dir: Path) -> Path:
        """This rank's heartbeat file in run_dir."""
        return run_dir / f"heartbeat-rank{self.rank}.json"

    def arms_faults(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether this rank arms $TWOTOWER_INJECT_FAULT: every rank (the first to reach a
        fire-once point fires it) unless $TWOTOWER_FAULT_RANK names another rank."""
        env = os.environ if environ is None else environ
        chosen = env.get(FAULT_RANK_ENV, "").strip()
        return not chosen or chosen == str(self.rank)

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` rows."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def launched_world(environ: Mapping[str, str] | None = None) -> World | None:
    """The world torchrun describes in the environment; None outside torchrun (no WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    if WORLD_SIZE_ENV not in env:
        return None
    try:
        return World(
            rank=int(env[RANK_ENV]),
            size=int(env[WORLD_SIZE_ENV]),
            local_rank=int(env.get(LOCAL_RANK_ENV, "0")),
            local_size=int(env.get(LOCAL_WORLD_SIZE_ENV, "1")),
            restart=int(env.get(RESTART_COUNT_ENV, "0")),
        )
    except (KeyError, ValueError) as error:
        raise UsageError(
            f"torchrun environment is incomplete or malformed ({error}): start ranks with "
            "`torchrun --nproc-per-node N -m twotower train ...`"
        ) from None


def check_config(config: TrainConfig, world: World) -> None:
    """Refuse, before anything starts, what a data-parallel run cannot do (UsageError, one line)."""
    if config.backend in ("numpy", "torch-mps"):
        raise UsageError(
            f"--backend {config.backend} runs in one process only; under torchrun use --backend "
            "torch-cpu (gloo) or torch-cuda (nccl), or run `twotower train` without torchrun"
        )
    if config.batch_size % world.size:
        fitting = -(-config.batch_size // world.size) * world.size
        raise UsageError(
            f"--batch-size {config.batch_size} does not split into {world.size} equal rank "
            f"shares; use a multiple of {world.size} (e.g. --batch-size {fitting}) or another "
            "--nproc-per-node"
        )


class ShardPlan:
    """A StepPlan seen by one rank: `rows_for(step)` gives this rank's rows of the global batch."""

    def __init__(self, plan: StepPlan, world: World):
        self.plan = plan
        self.shard = world.shard(plan.batch_size)

    def rows_for(self, step: int) -> np.ndarray:
        """(B / W,) dataset rows of this rank's share of step `step`."""
        return self.plan.rows_for(step)[self.shard]


class Group:
    """The torch.distributed process group of a run, and the exchanges the trainer needs.

    world: this process's place; device: "cuda" for torch-cuda (nccl, one GPU per
    local rank), anything else gloo on the CPU; timeout_s: how long a collective
    may wait for the other ranks before it fails; ledger: where this rank counts
    the collectives it enters (`twotower.process.collective_ledger`).
    `training.ranks.solo.Solo` has the same interface for a run of one process.
    """

    # a refresh is mined at once at its take step: a search in a thread would interleave its
    # all-gather with the step's all-reduce, and the ranks' collectives must stay in one order
    searches_beside_training = False

    def __init__(
        self, world: World, device: str, timeout_s: float, ledger: CollectiveLedger | None = None
    ):
        import torch
        import torch.distributed as dist

        self.world = world
        self.ledger = ledger
        self.seconds = 0.0  # in gathers since the last take_seconds()
        self._dist = dist
        self._torch = torch
        self.device = torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(world.local_rank)
            self.device = torch.device("cuda", world.local_rank)
        timeout = timedelta(seconds=timeout_s)
        # torchrun's agent keeps one store across restarts: a prefix per group keeps a new
        # group from reading the addresses the previous one left there
        hosted_by_agent = os.environ.get(AGENT_STORE_ENV) == str(True)
        store = dist.TCPStore(
            os.environ.get(MASTER_ADDR_ENV, "127.0.0.1"),
            int(os.environ.get(MASTER_PORT_ENV, "29500")),
            world.size,
            is_master=world.rank == 0 and not hosted_by_agent,
            timeout=timeout,
        )
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            store=dist.PrefixStore(f"twotower/group-{world.restart}", store),
            rank=world.rank,
            world_size=world.size,
            timeout=timeout,
        )

    @property
    def writes_run_files(self) -> bool:
        """Rank 0 alone writes the run's files."""
        return self.world.writes_run_files

    def heartbeat_path(self, run: RunDir) -> Path:
        """This rank's heartbeat file in the run directory."""
        return self.world.heartbeat_path(run.root)

    def cores(self, usable: int) -> int:
        """This rank's share of the `usable` cores (the ranks on this machine share them)."""
        return max(1, usable // self.world.local_size)

    def arms_faults(self) -> bool:
        """Whether this rank arms $TWOTOWER_INJECT_FAULT (`World.arms_faults`)."""
        return self.world.arms_faults()

    def rows(self, plan: StepPlan) -> ShardPlan:
        """What this rank gathers of each step: its share of the global batch."""
        return ShardPlan(plan, self.world)

    def first_row(self, batch_size: int) -> int:
        """Where this rank's queries start in a global batch of `batch_size` rows."""
        return self.world.shard(batch_size).start

    def join_backend(self, backend: Backend) -> None:
        """Make the torch engine sum its gradients and loss over the group."""
        backend.join_data_parallel(  # type: ignore[attr-defined]
            self.world.rank, self.world.size, self.ledger
        )

    def meet(self, run: RunDir) -> None:
        """Wait until the run directory exists for every rank's heartbeat; log this rank."""
        self.barrier()
        log.info("rank %d of %d joined (%s)", self.world.rank, self.world.size, run.root)

    def close(self) -> None:
        """Leave the group (the other ranks should have left or be leaving too)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait until every rank has reached this point."""
        with counted(self.ledger, "barrier"):
            self._dist.barrier()

    def rank_zero_first(self, make: Callable[[], _T]) -> _T:
        """`make()` on rank 0, then on the others: for work that fills a shared cache."""
        if self.world.rank == 0:
            made = make()
            self.barrier()
            return made
        self.barrier()
        return make()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one."""
        value = self._torch.tensor([1 if flag else 0], device=self.device)
        with counted(self.ledger, "flag"):
            self._dist.all_reduce(value, op=self._dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        """Every rank's (n, ...) array, same shape on each, stacked in rank order: (W * n, ...)."""
        started = time.perf_counter()
        local = self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        parts = [self._torch.empty_like(local) for _ in range(self.world.size)]
        with counted(self.ledger, "gather"):
            self._dist.all_gather(parts, local)
        result = self._torch.cat(parts).cpu().numpy()
        self.seconds += time.perf_counter() - started
        return result

    def take_seconds(self) -> float:
        """Seconds spent in gathers since the last call (and reset the count)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def collective_fields(self, backend: Backend) -> dict[str, float]:
        """A step record's `collective_ms`: the all-gather of positives and the all-reduce of
        gradients since the last step."""
        seconds = self.take_seconds() + backend.data_parallel.take_seconds()  # type: ignore[attr-defined]
        return {"collective_ms": round(seconds * 1e3, 2)}

    def gather_positives(self, data: StepData, global_rows: np.ndarray) -> StepData:
        """This rank's step data with the global batch's positive ids (B,) and vectors (B, D)
        in global order; contexts, lengths and context ids stay this rank's (B / W rows)."""
        faults.set_step(data.step)  # the ledger counts these gathers as this step's
        return dataclasses.replace(
            data,
            rows=global_rows,
            positive_ids=self.gather_rows(data.positive_ids),
            positive_vecs=self.gather_rows(data.positive_vecs),
        )

    def mine(
        self,
        miner: Miner,
        encode: Callable[[np.ndarray], np.ndarray],
        dataset: Dataset,
        train_rows: np.ndarray,
        config: TrainConfig,
    ) -> tuple[HardNegativeTable, MiningReport]:
        """The table a 1-process mining of train_rows makes, each rank mining a share.

        encode(rows) -> (n, D) query vectors. Rank r takes the r-th of W near-equal
        contiguous parts of train_rows; the mined rows are all-gathered (padded to the
        largest part) and every rank assembles the same (N, pool) table. The report's
        counts are summed over ranks.
        """
        parts = np.array_split(np.asarray(train_rows, dtype=np.int64), self.world.size)
        mine_rows = parts[self.world.rank]
        table, report = mine_table(miner, encode(mine_rows), dataset, mine_rows, config)
        longest = max(len(part) for part in parts)
        share = np.full((longest, table.pool), -1, dtype=np.int64)
        share[: len(mine_rows)] = table.ids[mine_rows]
        shares = self.gather_rows(share).reshape(self.world.size, longest, table.pool)
        for rows, mined in zip(parts, shares, strict=True):
            table.ids[rows] = mined[: len(rows)]
        return table, self._summed(report)

    def mine_refresh(
        self,
        refresh: Refresh,
        miner: Miner,
        exact: Miner | None,
        dataset: Dataset,
        config: TrainConfig,
    ) -> Mined:
        """`refresh` mined by every rank, each a share of its rows (`mine`); no recall probe
        (`exact` is not used)."""

        def share(rows: np.ndarray) -> np.ndarray:  # this rank's part of the encoded queries
            return refresh.queries[np.searchsorted(refresh.rows, rows)]

        started = time.perf_counter()
        with faults.at_step(refresh.take):
            table, report = self.mine(miner, share, dataset, refresh.rows, config)
        return Mined(table, report, miner.name, time.perf_counter() - started, None)

    def _summed(self, report: MiningReport) -> MiningReport:
        """The report with every count summed over ranks (skip and pool are the same on each)."""
        names = [f.name for f in fields(MiningReport) if f.name not in ("skip", "pool")]
        values = np.array([getattr(report, name) for name in names], dtype=np.int64)
        totals = self.gather_rows(values[None, :]).sum(axis=0)
        return MiningReport(
            skip=report.skip,
            pool=report.pool,
            **{name: int(total) for name, total in zip(names, totals, strict=True)},
        )

"""`twotower replay`: rebuild one step of a run exactly, and compare every engine on it.

Step N means what it means in a crash report, a heartbeat and
TWOTOWER_INJECT_FAULT: the update made when N steps were done (metrics.jsonl
logs it as step N + 1). Determinism (docs/DESIGN.md) makes it rebuildable from the
run directory alone, which replay only reads:

- start from the newest checkpoint c <= N that verifies and whose mined table
  is there (or from the initial parameters, c = 0, when there is none);
- re-run steps c..N-1 on the engine the run used for them (its "start"
  records in metrics.jsonl), mining where the run mined: from the table the run
  saved for that step in mined/, or, when it has been pruned, by mining again
  with the miner the run used (and saying so);
- assemble step N's batch (rows from the step, hard negatives drawn with the
  step's seed from the table, the queue as it stands) and refuse, exit code 2,
  when its digest is not the one metrics.jsonl logged for that step;
- compute loss and gradients on each requested backend and on the float64
  reference from the same parameters, and judge each array with
  `twotower.agreement` (the tolerance table the tests use).

Exit codes (`ReplayReport.exit_code`): 0 every backend agrees, 1 one
disagrees or returns non-finite values, 2 bad input or a batch that is not
the logged one. Known limitation: an injected `nan` fault between c and N is
not injected again, so the re-run applies the update the run skipped (the
logged-loss line then says the state differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import reference
from twotower import backends, miners
from twotower.agreement import REPLAY_TOLERANCES, disagreement
from twotower.backends import Backend, make_backend
from twotower.batch import Batch
from twotower.config import TrainConfig
from twotower.data import Dataset, load_dataset
from twotower.errors import EXIT_OK, UsageError
from twotower.paths import user_cache_dir
from twotower.run.records import CheckpointMeta
from twotower.run.rundir import RunDir, read_metrics
from twotower.run.settings import read_run_config
from twotower.training.batching import StepPlan, gather_step
from twotower.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_record,
    step_dir_name,
)
from twotower.training.evaluation.heldout import held_out
from twotower.training.evaluation.metrics import encode_rows
from twotower.training.negatives.bank_negatives import BankNegatives, logq_table
from twotower.training.negatives.mining import HardNegativeTable, mine_table
from twotower.training.negatives.queue import MemoryQueue
from twotower.training.negatives.refresh import MINING_CHUNK, MiningSchedule, load_refresh
from twotower.training.ranks.solo import Solo
from twotower.training.schedule import LRSchedule, planned_steps
from twotower.training.step import StepState, prepare, update

EXIT_DISAGREE = 1
STEP_EVENTS = ("step", "nonfinite")  # metrics.jsonl records that carry a step's batch digest


@dataclass(frozen=True)
class Comparison:
    """One array of one backend against the reference.

    rel_error: max |actual - reference| / max |reference| (nan when a value is
    not finite); nonfinite: how many values are NaN or Inf; problem: what
    `agreement.disagreement` says is out of tolerance, None when it agrees.
    """

    name: str
    rel_error: float
    nonfinite: int
    problem: str | None


@dataclass
class BackendResult:
    """Loss and gradients of one backend on the replayed batch, judged array by array."""

    backend: str
    dtype: np.dtype
    loss: float
    comparisons: list[Comparison]

    @property
    def agrees(self) -> bool:
        """True when the loss and every gradient are within tolerance."""
        return all(c.problem is None for c in self.comparisons)


@dataclass
class ReplayReport:
    """What `replay` rebuilt and found; `to_text()` is the CLI's table, `exit_code` its status."""

    run: Path
    step: int
    digest: str
    logged_digest: str | None
    notes: list[str]
    reference_loss: float
    results: list[BackendResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every backend agrees with the reference, else 1."""
        return EXIT_OK if all(result.agrees for result in self.results) else EXIT_DISAGREE

    def to_text(self) -> str:
        """The report as the CLI prints it: what was rebuilt, then one table per backend."""
        lines = [f"replay {self.run} step {self.step} (metrics.jsonl step {self.step + 1})"]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"  reference loss (float64): {self.reference_loss:.9g}")
        for result in self.results:
            rtol, atol = REPLAY_TOLERANCES.get(result.dtype, (float("nan"), float("nan")))
            lines.append(
                f"\n{result.backend} vs reference ({result.dtype}: rtol {rtol:g}, "
                f"atol {atol:g} x max|reference|)"
            )
            lines.append(f"  {'quantity':24s} {'max rel err':>11s} {'non-finite':>10s}  verdict")
            for c in result.comparisons:
                verdict = "ok" if c.problem is None else "DISAGREES"
                lines.append(f"  {c.name:24s} {c.rel_error:11.3g} {c.nonfinite:10d}  {verdict}")
                if c.problem is not None:
                    lines.append(f"    {c.problem}")
        bad = [result.backend for result in self.results if not result.agrees]
        if bad:
            verb = "disagrees" if len(bad) == 1 else "disagree"
            lines.append(f"\nreplay: {', '.join(bad)} {verb} with the float64 reference")
        else:
            lines.append("\nreplay: every backend agrees with the float64 reference")
        lines[-1] += f" (exit code {self.exit_code})"
        return "\n".join(lines)


# --- opening a run read-only ------------------------------------------------------------


@dataclass
class RunView:
    """A run directory opened for reading: its config, dataset, step plan and metrics records."""

    run: RunDir
    config: TrainConfig
    dataset: Dataset
    train_rows: np.ndarray
    plan: StepPlan
    records: list[dict[str, Any]]
    from_bank: BankNegatives  # what each step takes from the whole bank, as the run did

    def logged(self, event: str, step: int) -> list[dict[str, Any]]:
        """metrics.jsonl records of `event` with this `step` field, oldest first."""
        return [r for r in self.records if r.get("event") == event and r.get("step") == step]


def open_run(run: str | Path, data: str | None = None) -> RunView:
    """Open RUN (config.json, metrics.jsonl, dataset) without writing to it.

    data: the dataset's path when it has moved since the run (default: the run's).
    Raises UsageError (one line) when the run or its data cannot be read.
    """
    run_dir = RunDir(run)
    # a missing run is one line naming the runs nearby (read_run_config says it)
    config = read_run_config(run_dir.root, resume=False, **({"data": data} if data else {}))
    dataset = load_dataset(config.data)  # type: ignore[arg-type]  # validate() ensures a path
    config = config.for_data(dataset.context_ids is not None)
    train_rows = held_out(config, dataset).train_rows
    records = read_metrics(run_dir.metrics) if run_dir.metrics.is_file() else []
    plan = StepPlan(train_rows, config.batch_size, config.seed)
    log_freq = None
    if config.logq:
        positives = dataset.positives[train_rows]
        log_freq = logq_table(run_dir.root, positives, dataset.bank_size, write=False)
    sampled = config.sampled_negatives or 0
    from_bank = BankNegatives(config.bank_negatives, sampled, dataset.bank, log_freq)
    return RunView(run_dir, config, dataset, train_rows, plan, records, from_bank)


def checkpoint_step(ckpt: Path) -> int:
    """The step of a committed checkpoint directory: step-0000014 -> 14."""
    return int(ckpt.name.removeprefix("step-"))


def last_step(view: RunView) -> int:
    """The highest step replay can rebuild: the one in flight when the run stopped, or,
    for a run that finished, its last update (its last attempt logged "done")."""
    logged = [int(r["step"]) for r in view.records if r.get("event") in STEP_EVENTS]
    saved = [checkpoint_step(path) for path in list_checkpoints(view.run.root)]
    done = max(logged + saved + [0])
    starts = [i for i, r in enumerate(view.records) if r.get("event") == "start"]
    last_attempt = view.records[starts[-1] if starts else 0 :]
    finished = any(r.get("event") == "done" for r in last_attempt)
    return done - 1 if finished else done


# --- rebuilding step N ------------------------------------------------------------------


def _engine_name(view: RunView, step: int, meta: CheckpointMeta | None) -> tuple[str, str]:
    """(backend to re-run the steps before `step` on, why): the one the run's last attempt
    that began at or before `step` used (else the checkpoint's), if this machine has it."""
    starts = [r for r in view.records if r.get("event") == "start" and r.get("step", 0) <= step]
    saved_on = meta.backend if meta is not None else None
    run_engine = starts[-1]["backend"] if starts else saved_on or view.config.backend
    run_engine = backends.resolve(run_engine)
    if run_engine in backends.available():
        return run_engine, f"on {run_engine}, as the run did"
    chain = [name for name in view.config.fallback if name in backends.available()]
    here = chain[0] if chain else "numpy"
    return here, f"on {here}: the run used {run_engine}, which this machine lacks"


def _saved_table(view: RunView, use: int) -> Path:
    return view.run.mined / f"table-{step_dir_name(use)}.npy"


def _unusable(view: RunView, meta: CheckpointMeta) -> str | None:
    """Why a checkpoint cannot start a rebuild (a file it needs is gone), None if it can."""
    table_name = meta.mined_table
    if table_name and not (view.run.mined / table_name).is_file():
        return f"its mined table {table_name} is gone"
    mining = meta.mining
    if (
        mining
        and not (view.run.mined / mining["queries"]).is_file()
        and not _saved_table(view, mining["use"]).is_file()
    ):
        return f"the queries of its mining in flight, {mining['queries']}, are gone"
    return None


def _step_state(view: RunView, backend: Backend) -> StepState:
    """A step state on `backend` with an empty queue and table, and the run's plans."""
    c, dim = view.config, view.dataset.dim
    total = planned_steps(c, view.plan.batches_per_epoch)
    return StepState(
        c,
        view.dataset.bank,
        view.plan,
        MiningSchedule.of(c, view.plan, total),
        LRSchedule.of(c, total),
        backend,
        MemoryQueue(c.queue_size, dim),
        HardNegativeTable.empty(view.dataset.num_samples, c.mine_pool),
        view.from_bank,
    )


class SavedRefreshes:
    """A rebuild's refreshes (`step.Refreshes`): the table the run saved for a use step, else
    mined again from the queries encoded at its take step (or saved by the checkpoint).

    taken: the queries of refreshes taken but not yet in use (use step -> (rows, queries)).
    """

    def __init__(self, view: RunView, state: StepState, notes: list[str]):
        self.view = view
        self.state = state
        self.notes = notes
        self.taken: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def take(self, step: int) -> None:
        """At a take step whose table the run did not keep, encode that refresh's queries now."""
        use = self.state.mining.use_taken_at(step)
        if use is None or _saved_table(self.view, use).is_file():
            return
        rows = self.state.mining.rows(use)
        gather = self.view.dataset.gather
        queries = encode_rows(self.state.backend, gather, rows, label="re-mine: encode")
        self.taken[use] = (rows, queries)

    def use(self, step: int) -> HardNegativeTable:
        """The table the run put into use before step `step`: its saved file, else mined
        again from the queries encoded at its take step."""
        view = self.view
        saved = _saved_table(view, step)
        if saved.is_file():
            self.notes.append(f"step {step}: mined table from {saved.relative_to(view.run.root)}")
            return HardNegativeTable.load(saved)
        c = view.config
        logged = view.logged("mined", step)
        name = logged[-1]["miner"] if logged else c.miner
        miner = miners.get_for(c, name, user_cache_dir() / "index")
        miner.build(view.dataset.bank, fingerprint=view.dataset.fingerprint)
        rows, queries = self.taken.pop(step)
        table, report = mine_table(miner, queries, view.dataset, rows, c, chunk_size=MINING_CHUNK)
        if logged:
            was = (
                f"as the run did: {report.negatives} negatives (logged: {logged[-1]['negatives']})"
            )
        else:
            was = f"the run logged no mining here (it stopped first): {report.negatives} negatives"
        self.notes.append(f"step {step}: no {saved.name}; mined again with {name}, {was}")
        return table


def _start(view: RunView, step: int, notes: list[str]) -> tuple[int, SavedRefreshes]:
    """The newest usable checkpoint at or before `step` (verified, its files present), loaded:
    (its step, the refreshes of the rebuild, whose `state` is the checkpoint's)."""
    config = view.config
    for ckpt in reversed(list_checkpoints(view.run.root)):
        if checkpoint_step(ckpt) > step:
            continue
        try:
            meta, saved = load_record(ckpt)
        except CheckpointError as error:
            notes.append(f"skipped {ckpt.name}: {error}")
            continue
        problem = _unusable(view, meta)
        if problem:
            notes.append(f"skipped {ckpt.name}: {problem}")
            continue
        name, why = _engine_name(view, step, meta)
        state = _step_state(view, make_backend(config, view.dataset.dim, name))
        state.backend.load_state(saved)
        state.queue.load_state(saved)
        if meta.mined_table:
            state.table = HardNegativeTable.load(view.run.mined / meta.mined_table)
        notes.append(f"from checkpoint {ckpt.name} (written on {meta.backend}); re-ran {why}")
        refreshes = SavedRefreshes(view, state, notes)
        mining = meta.mining
        if mining and (view.run.mined / mining["queries"]).is_file():
            refresh = load_refresh(mining, view.run.mined, state.mining)
            refreshes.taken[refresh.use] = (refresh.rows, refresh.queries)
        return meta.step, refreshes
    name, why = _engine_name(view, step, None)
    notes.append(f"from the initial parameters (no usable checkpoint <= {step}); re-ran {why}")
    state = _step_state(view, make_backend(config, view.dataset.dim, name))
    return 0, SavedRefreshes(view, state, notes)


def rebuild(view: RunView, step: int, notes: list[str]) -> tuple[StepState, Batch, str]:
    """(state at `step`, step's batch, its rows' digest), re-running from the checkpoint before
    with the trainer's own step (`training.step`).

    Appends what it did (checkpoint, engine, mined tables) to `notes`.
    """
    at, refreshes = _start(view, step, notes)
    state, solo = refreshes.state, Solo()
    exclude_context = bool(view.config.exclude_context)
    while True:
        data = gather_step(view.dataset, at, view.plan.rows_for(at), exclude_context)
        prepared = prepare(at, data, state, refreshes, solo)
        if at == step:
            return state, prepared.batch, prepared.data.digest
        update(at, prepared, state)
        at += 1


# --- comparing engines ------------------------------------------------------------------


def compare(name: str, actual: Any, expected: Any) -> Comparison:
    """Judge one engine array against the reference's with the tolerance of its dtype."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    nonfinite = int(actual.size - np.count_nonzero(np.isfinite(actual)))
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    error = float(np.max(np.abs(actual.astype(np.float64) - expected))) if actual.size else 0.0
    dtype = actual.dtype if actual.dtype in REPLAY_TOLERANCES else np.dtype(np.float32)
    rel_error = error / scale if scale > 0 else error
    problem = disagreement(actual, expected, dtype, tolerances=REPLAY_TOLERANCES)
    return Comparison(name, rel_error, nonfinite, problem)


def run_backend(
    name: str, view: RunView, params: dict[str, np.ndarray], batch: Batch, expected: Any
) -> BackendResult:
    """Loss and gradients of backend `name` from `params` on `batch`, judged against
    expected = (reference loss, reference gradients)."""
    engine = make_backend(view.config, view.dataset.dim, name)
    engine.load_state(params)
    loss, grads = engine.loss_and_grads(batch)
    expected_loss, expected_grads = expected
    dtype = next(iter(grads.values())).dtype if grads else np.dtype(np.float32)
    comparisons = [compare("loss", np.asarray(loss, dtype=dtype), expected_loss)]
    comparisons += [compare(key, grads.get(key), value) for key, value in expected_grads.items()]
    return BackendResult(engine.name, np.dtype(dtype), float(loss), comparisons)


def replay(
    run: str | Path, step: int, names: list[str] | None = None, data: str | None = None
) -> ReplayReport:
    """Rebuild step `step` of `run` and compare backends `names` (default: every available one)
    with the float64 reference. Raises UsageError (exit code 2) for a step the run never
    reached, an unknown or unavailable backend, or a rebuilt batch that is not the logged one."""
    names = names or backends.available()
    for name in names:
        backends.REGISTRY.require(name)
    view = open_run(run, data)
    last = last_step(view)
    if not 0 <= step <= last:
        raise UsageError(f"--step {step}: {view.run.root} holds steps 0..{last}; give one of those")
    notes: list[str] = []
    state, batch, digest = rebuild(view, step, notes)
    logged = view.logged("step", step + 1) + view.logged("nonfinite", step + 1)
    digests = {record["batch"] for record in logged}
    if digests - {digest}:
        raise UsageError(
            f"step {step}: the rebuilt batch {digest} is not the logged {', '.join(digests)} "
            "(the data or config.json changed since the run); replay refused"
        )
    rows = f"{len(batch.positive_ids)} rows, K {batch.hard_ids.shape[1]}, Q {len(batch.queue_ids)}"
    if logged:
        notes.insert(0, f"batch {digest} ({rows}) is the logged one")
    else:
        notes.insert(0, f"batch {digest} ({rows}); no logged record (the step did not finish)")
    params = {k: v for k, v in state.backend.state().items() if not k.startswith("opt.")}
    expected = reference.loss_and_grads(
        view.config.tower,
        {k: v.astype(np.float64) for k, v in params.items()},
        batch,
        view.config.temperature,
        str(view.config.residual),  # resolved by TrainConfig: never None here
    )
    report = ReplayReport(
        view.run.root,
        step,
        digest,
        logged[-1]["batch"] if logged else None,
        notes,
        float(expected[0]),
    )
    report.results = [run_backend(name, view, params, batch, expected) for name in names]
    own = next((r for r in report.results if r.backend == state.backend.name), None)
    if logged and own is not None:
        then = float(logged[-1]["loss"])
        same = bool(np.isclose(own.loss, then, rtol=1e-5, atol=0.0, equal_nan=True))
        verdict = "the state was rebuilt exactly" if same else "the rebuilt state differs"
        notes.append(f"loss on {own.backend}: {own.loss:.9g}, logged {then:.9g}: {verdict}")
    return report

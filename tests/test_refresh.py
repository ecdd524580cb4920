"""Hard-negative refreshes: the upcoming scope covers every row its steps train on and agrees
with mining every row; overlapped mining equals synchronous mining; the recall probe is right
and its warning fires for a weak index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twotower import backends, miners
from twotower.config import TrainConfig
from twotower.data import synthesize
from twotower.run.rundir import read_metrics
from twotower.training.batching import StepPlan
from twotower.training.checkpoint import load_checkpoint
from twotower.training.evaluation.heldout import held_out_split
from twotower.training.evaluation.metrics import encode_rows
from twotower.training.negatives.mining import mine_table
from twotower.training.negatives.refresh import (
    MiningSchedule,
    Refresh,
    recall_warning,
    run_refresh,
)
from twotower.training.trainer import train


def steps_rows(train_rows: np.ndarray, batch: int, seed: int, start: int, stop: int) -> set[int]:
    """Rows steps [start, stop) train on, computed here from docs/DESIGN.md's batch order:
    epoch e's order is permutation(SeedSequence([seed, e])) of the training rows, step s takes
    the next B of it, the trailing partial batch is dropped."""
    per_epoch = len(train_rows) // batch
    rows: set[int] = set()
    for step in range(start, stop):
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(train_rows)
        rows.update(order[index * batch : (index + 1) * batch].tolist())
    return rows


# (training rows, batch, mine_every): batches per epoch 12, 14, 3, 33
COMBOS = [(100, 8, 5), (100, 7, 13), (50, 16, 4), (200, 6, 40)]


@pytest.mark.parametrize(("n", "batch", "every"), COMBOS)
def test_the_upcoming_scope_covers_every_row_its_steps_train_on(
    n: int, batch: int, every: int
) -> None:
    rng = np.random.default_rng(n + batch)
    train_rows = np.sort(rng.choice(3 * n, size=n, replace=False))
    plan = StepPlan(train_rows, batch, seed=7)
    per_epoch = n // batch
    schedule = MiningSchedule(plan, every, lead=every // 2, scope="upcoming", total=10**6)
    crossed = False
    for use in range(every, 4 * per_epoch + 2 * every, every):
        rows = schedule.rows(use)
        expected = steps_rows(train_rows, batch, 7, use, use + every)
        assert set(rows.tolist()) == expected, f"window at {use}"
        assert np.all(np.diff(rows) > 0)
        crossed |= use // per_epoch != (use + every - 1) // per_epoch
    assert crossed, "no window crossed an epoch boundary"
    everything = MiningSchedule(plan, every, lead=0, scope="all", total=10**6)
    assert np.array_equal(everything.rows(every), train_rows)


@pytest.mark.parametrize(("every", "lead"), [(10, 0), (10, 3), (7, 6), (1, 0)])
def test_the_schedule_takes_each_refresh_lead_steps_before_its_use(every: int, lead: int) -> None:
    plan = StepPlan(np.arange(40), 4, seed=0)
    total = 7 * every  # the refresh used at step `total` would serve no step: never taken
    schedule = MiningSchedule(plan, every, lead, "upcoming", total)
    uses = [k * every for k in range(1, 7)]
    takes = {use - lead: use for use in uses}
    for step in range(total + 1):
        assert schedule.use_taken_at(step) == takes.get(step)
        assert schedule.is_use(step) == (step in uses or step == total)
        # a checkpoint after `step` steps holds the refresh taken before and used at/after it
        flying = [use for use in uses if use - lead < step <= use]
        assert schedule.in_flight_at(step) == (flying[0] if flying else None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=400, bank=600, dim=16, seq_len=6, seed=4)
    return path


def run_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(data),
        out=str(out),
        backend="numpy",
        hidden=8,
        batch_size=16,
        steps=40,
        hard_negatives=3,
        mine_every=12,
        mine_pool=6,
        queue_size=32,
        checkpoint_every=12,
        keep_checkpoints=100,
        max_eval=40,
        supervise=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_every_table_covers_the_rows_of_the_steps_it_serves(data: Path, tmp_path: Path) -> None:
    """A whole run: 380 training rows, 23 batches per epoch, refreshes used at 12, 24 (its
    window crosses into epoch 1) and 36; each table has ids for exactly its window's rows."""
    config = run_config(data, tmp_path / "run", mine_lead=5)
    assert train(config).steps == 40
    train_rows, _ = held_out_split(400, config.eval_fraction, config.max_eval, config.seed)
    for use in (12, 24, 36):
        table = np.load(tmp_path / "run" / "mined" / f"table-step-{use:07d}.npy")
        window = steps_rows(train_rows, 16, 0, use, use + 12)
        mined = set(np.flatnonzero((table >= 0).any(axis=1)).tolist())
        assert mined == window, f"table used at {use}"


def test_no_refresh_is_taken_for_the_end_of_the_run(data: Path, tmp_path: Path) -> None:
    """36 steps, a refresh every 12 taken 5 before its use: the one used at 36 would serve no
    step, so no queries are encoded at step 31 and the last checkpoint holds none in flight."""
    config = run_config(data, tmp_path / "run", steps=36, mine_lead=5)
    assert train(config).steps == 36
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "mined"] == [12, 24]
    saved = sorted(p.name for p in (tmp_path / "run" / "mined").iterdir())
    assert saved == [
        "queries-step-0000007.npy",
        "queries-step-0000019.npy",
        "table-step-0000012.npy",
        "table-step-0000024.npy",
    ]
    meta, _ = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 36 and "mining" not in meta


def test_the_upcoming_and_all_scopes_give_the_same_rows(data: Path) -> None:
    """The same tower, the same queries: the upcoming scope's rows equal the all scope's on the
    window's rows (same ids; a swap only between scores equal to float32 rounding)."""
    config = run_config(data, Path("unused"))
    dataset = synthesize(data, samples=400, bank=600, dim=16, seq_len=6, seed=4)
    train_rows, _ = held_out_split(400, config.eval_fraction, config.max_eval, config.seed)
    plan = StepPlan(train_rows, config.batch_size, config.seed)
    backend = backends.make_backend(config, dataset.dim, "numpy")
    miner = miners.get("exact")
    miner.build(dataset.bank)
    tables = {}
    for scope in ("upcoming", "all"):
        rows = MiningSchedule(plan, 12, 0, scope, 40).rows(24)
        queries = encode_rows(backend, dataset.gather, rows)
        tables[scope], _ = mine_table(miner, queries, dataset, rows, config)
    window = MiningSchedule(plan, 12, 0, "upcoming", 40).rows(24)
    assert len(window) < len(train_rows)
    upcoming, everything = tables["upcoming"].ids, tables["all"].ids
    queries = encode_rows(backend, dataset.gather, window).astype(np.float64)
    bank = np.asarray(dataset.bank, dtype=np.float64)
    for row, query in zip(window, queries, strict=True):
        if not np.array_equal(upcoming[row], everything[row]):
            scores_a = np.sort(bank[upcoming[row]] @ query)
            scores_b = np.sort(bank[everything[row]] @ query)
            np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-5)
    outside = np.setdiff1d(train_rows, window)
    assert (upcoming[outside] == -1).all() and (everything[outside] >= 0).any()


@pytest.mark.parametrize("backend", ["numpy", pytest.param("torch-cpu", marks=pytest.mark.slow)])
def test_overlapped_mining_equals_synchronous_mining(
    data: Path, tmp_path: Path, backend: str
) -> None:
    if backend not in backends.available():
        pytest.skip(f"{backend} is not available")
    runs = {}
    for overlap in (True, False):
        out = tmp_path / f"overlap-{overlap}"
        config = run_config(data, out, backend=backend, mine_lead=5, mine_overlap=overlap)
        assert train(config).steps == 40
        runs[overlap] = out
    _, state = load_checkpoint(runs[True])
    _, expected = load_checkpoint(runs[False])
    assert set(state) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    for use in (12, 24, 36):
        name = f"table-step-{use:07d}.npy"
        np.testing.assert_array_equal(
            np.load(runs[True] / "mined" / name), np.load(runs[False] / "mined" / name)
        )
    takes = [r["take"] for r in read_metrics(runs[True] / "metrics.jsonl") if r["event"] == "mined"]
    assert takes == [7, 19, 31]


@pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")
def test_the_recall_probe_equals_an_independent_recall_and_warns_for_a_weak_index(
    tmp_path: Path,
) -> None:
    """faiss IVF64 searching one list of 64 (nprobe 1) on clustered data misses neighbours;
    the probe's recall@k equals the share of exact top-k ids computed here in float64."""
    dataset = synthesize(tmp_path / "data", samples=600, bank=4000, dim=32, seq_len=4, seed=6)
    config = run_config(
        tmp_path / "data", tmp_path / "run", miner="faiss", faiss_index="IVF64,Flat", mine_probe=48
    )
    weak = miners.get("faiss", isolation="none", index="IVF64,Flat", nprobe=1)
    weak.build(dataset.bank)
    exact = miners.get("exact", fault_phase=None)
    exact.build(dataset.bank)
    rows = np.arange(200)
    contexts, lengths, _ = dataset.gather(rows)
    queries = contexts[:, 0] + 0.05 * contexts[:, 1]  # near the clustered bank rows
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    mined = run_refresh(Refresh(3, 5, rows, queries), weak, exact, dataset, config)
    probe = mined.probe
    assert probe is not None and probe.queries == 48 and probe.k == config.mine_pool
    sample = queries[np.unique(np.linspace(0, 199, 48).astype(int))]
    assert len(sample) == 48
    _, found = weak.search(sample, probe.k)
    truth = np.argsort(-(sample.astype(np.float64) @ np.asarray(dataset.bank, np.float64).T), 1)
    shares = [len(set(f) & set(t[: probe.k])) / probe.k for f, t in zip(found, truth, strict=True)]
    assert probe.recall == pytest.approx(np.mean(shares), abs=1 / (48 * probe.k))
    assert probe.recall < config.min_mining_recall
    warning = recall_warning(probe, config, mined.miner)
    assert warning is not None and "nprobe" in warning and f"{probe.recall:.2f}" in warning

    strong = miners.get("faiss", isolation="none", index="IVF64,Flat", nprobe=64)
    strong.build(dataset.bank)
    good = run_refresh(Refresh(3, 5, rows, queries), strong, exact, dataset, config).probe
    assert good is not None and good.recall > 0.99
    assert recall_warning(good, config, "faiss") is None


def test_an_exact_miner_is_not_probed(data: Path, tmp_path: Path) -> None:
    config = run_config(data, tmp_path / "run", steps=13)
    train(config)
    mined = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "mined"]
    assert len(mined) == 1 and "recall" not in mined[0]


def test_a_run_from_before_mining_scopes_resumes_only_with_its_own_mining() -> None:
    """A config.json without mine_scope / mine_lead was a run that mined every row at the step
    of use: resuming it under the new defaults would change its numbers, so it is refused
    with what to pass, and accepted with `--mine-scope all --mine-lead 0`."""
    stored = TrainConfig(data="d").to_dict()
    del stored["mine_scope"], stored["mine_lead"]
    assert sorted(TrainConfig(data="d").numeric_differences(stored)) == [
        "mine_lead: 0 -> None",
        "mine_scope: 'all' -> 'upcoming'",
    ]
    assert TrainConfig(data="d", mine_scope="all", mine_lead=0).numeric_differences(stored) == []


@pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")
def test_a_weak_index_warns_from_the_cli_with_the_flag_to_raise(tmp_path: Path) -> None:
    """--faiss-nprobe 1 of 64 lists on clustered data: the refresh logs its recall@pool and
    warns, naming --faiss-nprobe; the mined event carries the probe."""
    from tests.processes import train_in_child

    synthesize(tmp_path / "data", samples=600, bank=4000, dim=32, seq_len=4, seed=6)
    out = tmp_path / "run"
    args = "--no-supervise --backend numpy --hidden 16 --batch-size 16 --steps 12 --mine-every 10"
    args += " --max-eval 40 --queue-size 32 --miner faiss --faiss-index IVF64,Flat --faiss-nprobe 1"
    result = train_in_child(tmp_path / "data", out, *args.split())
    assert result.returncode == 0, result.stderr
    (mined,) = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "mined"]
    assert mined["recall_k"] == 32 and mined["probe_queries"] == 64
    assert mined["recall"] < 0.9
    assert f"recall@32 {mined['recall']:.2f} vs exact on 64" in result.stderr
    assert "below --min-mining-recall 0.9: raise --faiss-nprobe" in result.stderr

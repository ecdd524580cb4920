"""Data-parallel training under torchrun (gloo, 2 CPU ranks) computes the 1-process run.

The runs are real: `python -m torch.distributed.run --standalone --nproc-per-node 2 -m twotower
train ...`, compared with `twotower train --no-supervise` at the same global batch. A rank is
killed with a real SIGKILL (TWOTOWER_INJECT_FAULT aimed at rank 1) and torchrun restarts the
group. The shard arithmetic is also checked in two spawned gloo processes against a 1-process
step, with a negative control: ranks that gather only their own positives must not agree.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.agreement import assert_agrees, assert_differs
from tests.processes import REPO, child_env, run_twotower, train_in_child
from tests.runs import expected_stop
from twotower import backends
from twotower.batch import Batch
from twotower.data import synthesize
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import LATEST, list_checkpoints, load_checkpoint

pytestmark = pytest.mark.skipif(
    "torch-cpu" not in backends.available(), reason="torch.distributed needs torch"
)

STEPS = 12
RANK_FILES = (("heartbeat", "json"), ("collectives", "bin"))  # each rank's own, beside rank 0's
TRAIN_ARGS = (
    f"--backend torch-cpu --steps {STEPS} --batch-size 16 --hidden 12 --hard-negatives 3 "
    "--mine-every 5 --mine-pool 6 --queue-size 40 --checkpoint-every 4 --keep-checkpoints 5 "
    "--max-eval 40 --collective-timeout 120 --exclude-context --lr-schedule cosine "
    "--warmup-steps 3 --residual last"
).split()  # the recipe options too: seen-item masks on a shard, the schedule on every rank


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=300, bank=300, dim=16, seq_len=6, seed=1)
    return path


def torchrun(
    data: Path, out: Path, *args: str, ranks: int = 2, restarts: int = 0, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --standalone ... -m twotower train` in a child."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        f"--max-restarts={restarts}",
        "-m",
        "twotower",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *TRAIN_ARGS,
        *args,
    ]
    return subprocess.run(
        command, env=child_env(**env), capture_output=True, text=True, timeout=300, cwd=REPO
    )


def step_losses(run: Path) -> np.ndarray:
    """The loss of each step 1..STEPS, the last logged for a step (a restart repeats some)."""
    losses = {
        r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "step"
    }
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    return np.array([losses[s] for s in range(1, STEPS + 1)], dtype=np.float32)


def assert_same_state(actual: Path, expected: Path) -> None:
    """Parameters, optimizer moments and queue of two runs' newest checkpoints agree."""
    meta_a, state_a = load_checkpoint(actual)
    meta_e, state_e = load_checkpoint(expected)
    assert meta_a["step"] == meta_e["step"] == STEPS
    assert sorted(state_a) == sorted(state_e)
    for name, value in state_e.items():
        if value.dtype == np.float32:
            assert_agrees(state_a[name], value, np.float32, name)
        else:  # step counts, queue ids and head
            np.testing.assert_array_equal(state_a[name], value, err_msg=name)


@pytest.fixture(scope="module")
def one_process(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    result = train_in_child(dataset, out, "--no-supervise", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def two_ranks(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-rank run, launched under `twotower watch` (which must pass torchrun through)."""
    out = tmp_path_factory.mktemp("two") / "run"
    torchrun_command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "twotower", "train", "--data", str(dataset), "--out", str(out), *TRAIN_ARGS,
    ]  # fmt: skip
    result = run_twotower("watch", "--out", str(out.parent / "watch"), "--", *torchrun_command)
    assert result.returncode == 0, result.stderr
    assert not list((out.parent / "watch").glob("run-*.json")), "watch saw no crash"
    return out


@pytest.mark.slow
def test_two_ranks_compute_the_one_process_run(one_process: Path, two_ranks: Path) -> None:
    assert_agrees(step_losses(two_ranks), step_losses(one_process), np.float32, "loss per step")
    assert_same_state(two_ranks, one_process)
    digests = [
        [r["batch"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "step"]
        for run in (two_ranks, one_process)
    ]
    assert digests[0] == digests[1], "the global batch of every step is the 1-process batch"


@pytest.mark.slow
def test_hard_negatives_mined_across_ranks_equal_one_process(
    one_process: Path, two_ranks: Path
) -> None:
    tables = sorted(path.name for path in (one_process / "mined").glob("table-*.npy"))
    assert tables == ["table-step-0000005.npy", "table-step-0000010.npy"], tables
    for name in tables:
        expected = np.load(one_process / "mined" / name)
        assert (expected >= 0).any()
        np.testing.assert_array_equal(np.load(two_ranks / "mined" / name), expected)
    mined = [
        [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "mined"]
        for run in (two_ranks, one_process)
    ]
    # timings and each rank's thread count differ; the counts are summed over ranks
    drop = ("time", "seconds", "encode_seconds", "wait_seconds", "trainer_threads")
    assert [{k: v for k, v in r.items() if k not in drop} for r in mined[0]] == [
        {k: v for k, v in r.items() if k not in drop} for r in mined[1]
    ]


@pytest.mark.slow
def test_only_rank_0_writes_run_files(one_process: Path, two_ranks: Path) -> None:
    def files(run: Path) -> set[str]:
        return {str(path.relative_to(run)) for path in run.rglob("*") if path.is_file()}

    rank_files = {f"{name}-rank{rank}.{ext}" for rank in (0, 1) for name, ext in RANK_FILES}
    assert files(two_ranks) - rank_files == files(one_process) - {"heartbeat.json"}
    log = (two_ranks / "log.txt").read_text()
    assert "rank 0 of 2 joined" in log
    assert "rank 1 of 2 joined" not in log  # rank 1 logged it too, to no file
    events = [r["event"] for r in read_metrics(two_ranks / "metrics.jsonl")]
    assert events.count("start") == 1 and events.count("done") == 1
    assert events.count("step") == STEPS
    assert all(path.stat().st_size == 0 for path in (two_ranks / "crashes").iterdir())


@pytest.mark.slow
def test_rank_killed_torchrun_restarts_and_the_run_resumes(
    dataset: Path, two_ranks: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = torchrun(
        dataset, out, restarts=1, TWOTOWER_INJECT_FAULT="kill@step:6", TWOTOWER_FAULT_RANK="1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "crashes" / "rank1-attempt-1.json").read_text())
    assert report["rank"] == 1 and report["world_size"] == 2
    assert report["exit"]["signal"] == "SIGKILL"
    assert (report["where"]["phase"], report["where"]["step"]) == ("step", 6)
    assert "rank 1 of 2, attempt 1" in result.stderr and "SIGKILL" in result.stderr
    assert "resumed from step-0000004" in (out / "log.txt").read_text()
    assert load_checkpoint(out)[0]["step"] == STEPS
    assert_same_state(out, two_ranks)
    assert_agrees(step_losses(out), step_losses(two_ranks), np.float32, "loss per step")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gdb") is None, reason="native frames need gdb")
def test_a_ranks_segfault_report_has_its_native_frames(dataset: Path, tmp_path: Path) -> None:
    """The rank's guard allows its trainer a core and reads it: the faulting libc frame, under
    ctypes' string_at (segv@step:6 on rank 1); torchrun restarts and the run finishes."""
    out = tmp_path / "run"
    result = torchrun(
        dataset, out, restarts=1, TWOTOWER_INJECT_FAULT="segv@step:6", TWOTOWER_FAULT_RANK="1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "crashes" / "rank1-attempt-1.json").read_text())
    native = report["native"]
    assert report["exit"]["signal"] == "SIGSEGV" and native["note"] is None, native["note"]
    frames = next(t for t in native["threads"] if t["crashed"])["frames"]
    assert "libc.so" in frames[0]["library"] and "strlen" in frames[0]["symbol"], frames[:3]
    assert native["core"] == "core deleted after reading"
    assert "native frames (core " in result.stderr


@pytest.mark.slow
def test_a_rank_stuck_outside_a_collective_is_named_by_the_rank_that_waited(
    dataset: Path, tmp_path: Path
) -> None:
    """Rank 1 hangs at step 6 before its gradient all-reduce; rank 0's all-reduce times out
    after 5 s. Rank 0's report names rank 1 from the ranks' collective ledgers, and its
    evidence carries rank 1's heartbeat (the hang's step). About a minute: torchrun gives
    the stuck rank 30 s after SIGTERM before it kills it."""
    out = tmp_path / "run"
    fault = {"TWOTOWER_FAULT_RANK": "1", "TWOTOWER_INJECT_FAULT": "hang@step:6"}
    result = torchrun(dataset, out, "--collective-timeout", "5", **fault)
    assert result.returncode != 0, result.stderr
    report = json.loads((out / "crashes" / "rank0-attempt-1.json").read_text())
    waited, stuck = report["collectives"]["0"], report["collectives"]["1"]
    assert waited["waiting"] and (waited["kind"], waited["step"]) == ("gradients", 6)
    assert not stuck["waiting"] and stuck["entered"] == waited["entered"] - 1
    cause = report["causes"][0]
    assert cause["cause"].startswith(f"rank 1 never reached collective #{waited['entered']}")
    assert "phase step at step 6" in cause["evidence"][1]
    assert "rank 1 never reached collective" in result.stderr  # the summary on stderr


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_in_one_process(two_ranks: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(two_ranks, out)
    for checkpoint in list_checkpoints(out):
        if checkpoint.name != "step-0000004":
            shutil.rmtree(checkpoint)
    (out / "checkpoints" / LATEST).write_text("step-0000004")
    data = json.loads((out / "config.json").read_text())["data"]
    result = train_in_child(Path(data), out, "--no-supervise", "--resume", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    assert_same_state(out, two_ranks)


def test_patience_stops_every_rank_after_the_same_evaluation(dataset: Path, tmp_path: Path) -> None:
    """Rank 0 alone evaluates; its early stop reaches rank 1, so both leave the loop after the
    same step and write its checkpoint together (a rank left training would hang them both
    until --collective-timeout)."""
    out = tmp_path / "run"
    args = "--steps 60 --lr 1e-6 --warmup-steps 0 --eval-every 3 --patience 2".split()
    result = torchrun(dataset, out, *args)
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    stop = expected_stop([r for r in records if r["event"] == "eval"], 2)
    assert stop is not None and stop < 60  # a rate this small leaves nothing to gain
    assert [r["step"] for r in records if r["event"] == "early-stop"] == [stop]
    assert max(r["step"] for r in records if r["event"] == "step") == stop
    assert load_checkpoint(out)[0]["step"] == stop


def test_numpy_backend_and_uneven_batch_are_refused_under_torchrun(
    dataset: Path, tmp_path: Path
) -> None:
    torchrun_env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    for args, expected in [
        (["--backend", "numpy"], "--backend numpy runs in one process only"),
        (["--batch-size", "15"], "--batch-size 15 does not split into 2 equal rank shares"),
    ]:
        for supervise in ([], ["--no-supervise"]):
            out = tmp_path / f"run-{len(args)}-{len(supervise)}"
            result = train_in_child(dataset, out, *args, *supervise, **torchrun_env)
            assert result.returncode == 2, result.stderr
            assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
            assert not out.exists()


# --- one step's arithmetic, in two spawned gloo processes ---------------------------------

B, T, D, H, K, Q, RANKS, STEP_COUNT = 8, 5, 8, 6, 2, 5, 2, 3


def global_batch() -> Batch:
    """A batch of B with a duplicated positive (in-batch masking across the rank boundary), hard
    negatives that hit positives, and a queue holding a positive and an empty slot."""
    rng = np.random.default_rng(7)
    positive_ids = np.array([3, 9, 4, 11, 3, 6, 8, 2])  # rows 0 and 4: ranks 0 and 1
    bank = rng.standard_normal((12, D)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    hard_ids = np.array([[9, 5], [1, -1], [0, 4], [7, 10], [5, 6], [3, 1], [-1, -1], [2, 0]])
    queue_ids = np.array([6, -1, 1, 3, 10])
    lengths = rng.integers(1, T + 1, size=B)
    contexts = rng.standard_normal((B, T, D)).astype(np.float32)
    return Batch(
        contexts=contexts,
        lengths=lengths,
        positive_ids=positive_ids,
        positive_vecs=bank[positive_ids],
        hard_ids=hard_ids,
        hard_vecs=bank[np.maximum(hard_ids, 0)],
        queue_ids=queue_ids,
        queue_vecs=np.where(queue_ids[:, None] >= 0, bank[np.maximum(queue_ids, 0)], 0.0).astype(
            np.float32
        ),
    )


def rank_batch(batch: Batch, rank: int, gathered: bool) -> Batch:
    """Rank `rank`'s shard; its positives are the global batch's (gathered) or its own only."""
    rows = slice(rank * B // RANKS, (rank + 1) * B // RANKS)
    positives = slice(None) if gathered else rows
    return dataclasses.replace(
        batch,
        contexts=batch.contexts[rows],
        lengths=batch.lengths[rows],
        positive_ids=batch.positive_ids[positives],
        positive_vecs=batch.positive_vecs[positives],
        hard_ids=batch.hard_ids[rows],
        hard_vecs=batch.hard_vecs[rows],
    )


def rank_steps(rank: int, store: str, out: str) -> None:
    """One spawned rank: STEP_COUNT steps on its shard with gathered positives, then from the
    same start with its own positives only; saves losses and state of each."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    for gathered in (True, False):
        backend = backends.get("torch-cpu", dim=D, hidden=H, seed=3)
        backend.join_data_parallel(rank, RANKS)  # type: ignore[attr-defined]
        batch = rank_batch(global_batch(), rank, gathered)
        losses = np.array([backend.step(batch).loss for _ in range(STEP_COUNT)], np.float32)
        np.savez(f"{out}-{gathered}-rank{rank}.npz", losses=losses, **backend.state())
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank_shards_step_like_one_process_and_local_positives_do_not(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    backend = backends.get("torch-cpu", dim=D, hidden=H, seed=3)
    losses = np.array([backend.step(global_batch()).loss for _ in range(STEP_COUNT)], np.float32)
    expected = backend.state()
    out = tmp_path / "steps"
    mp.spawn(rank_steps, args=(str(tmp_path / "store"), str(out)), nprocs=RANKS)
    ranks = [dict(np.load(f"{out}-True-rank{rank}.npz")) for rank in range(RANKS)]
    for name, value in expected.items():
        np.testing.assert_array_equal(ranks[1][name], ranks[0][name], err_msg=name)
        if value.dtype == np.float32:
            assert_agrees(ranks[0][name], value, np.float32, name)
    assert_agrees(ranks[0]["losses"], losses, np.float32, "loss per step")
    control = dict(np.load(f"{out}-False-rank0.npz"))
    assert_differs(control["losses"], losses, np.float32, "losses with local positives only")
    assert_differs(control["proj.weight"], expected["proj.weight"], np.float32, "proj.weight")

"""Search parameters tuned to a recall target by default (faiss IVF nprobe, faiss HNSW
efSearch, hnswlib ef), checked against brute force computed here on queries the tuning never
saw; raising them on a low probe, through a worker, and keeping the raise across a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twotower import miners
from twotower.config import DEFAULT_TARGET_RECALL
from twotower.miners.faiss_miner import DEFAULT_NPROBE
from twotower.miners.tuning import recall_of

HAS_FAISS = "faiss" in miners.available()
HAS_HNSWLIB = "hnswlib" in miners.available()
K = 32


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bank of 64 clusters (20k x 32, normalized), 200 fresh queries near them, and the
    queries' exact top-K ids by brute force."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((64, 32)).astype(np.float32)
    points = centers[rng.integers(0, 64, 20_200)] + 0.3 * rng.standard_normal((20_200, 32))
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    bank, queries = points[:20_000], points[20_000:]
    truth = np.argsort(-(queries @ bank.T), axis=1)[:, :K]
    return bank, queries, truth


CASES = [
    pytest.param(
        "faiss",
        {"index": "IVF256,Flat"},
        "nprobe",
        marks=pytest.mark.skipif(not HAS_FAISS, reason="needs faiss"),
    ),
    pytest.param(
        "faiss",
        {"index": "HNSW8"},
        "efSearch",
        marks=pytest.mark.skipif(not HAS_FAISS, reason="needs faiss"),
    ),
    pytest.param(
        "hnswlib",
        {"M": 4, "ef_construction": 20},
        "ef",
        marks=pytest.mark.skipif(not HAS_HNSWLIB, reason="needs hnswlib"),
    ),
]


@pytest.mark.parametrize(("name", "opts", "param"), CASES)
def test_an_unset_search_parameter_is_tuned_to_the_target(
    clustered: tuple[np.ndarray, np.ndarray, np.ndarray], name: str, opts: dict, param: str
) -> None:
    bank, queries, truth = clustered
    tuned = miners.get(name, isolation="none", **opts)
    tuned.build(bank)
    info = tuned.build_info  # type: ignore[attr-defined]
    assert info["tuned"] == param and info["tuned_recall"] >= DEFAULT_TARGET_RECALL
    assert info["params"][param] == info[param]
    assert recall_of(tuned.search(queries, K)[1], truth) >= 0.9  # 0.95 on the tuning rows
    # the negative control: the smallest setting misses neighbours the tuned one finds
    weak = miners.get(name, isolation="none", **opts, **{engine_option(param): 1})
    weak.build(bank)
    assert "tuned" not in weak.build_info  # type: ignore[attr-defined]
    assert recall_of(weak.search(queries, K)[1], truth) < 0.9


def engine_option(param: str) -> str:
    """The engine's keyword option for a tuned parameter."""
    return {"nprobe": "nprobe", "efSearch": "ef_search", "ef": "ef"}[param]


@pytest.mark.skipif(not HAS_FAISS, reason="needs faiss")
def test_ivf_searches_only_the_lists_it_needs(
    clustered: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """On a clustered bank (the issue's case: nprobe 4 reached recall 1.0 where the old
    default searched 32 lists) the tuned nprobe is below the fixed default."""
    bank, _, _ = clustered
    tuned = miners.get("faiss", isolation="none", index="IVF64,Flat")
    tuned.build(bank)
    assert tuned.build_info["nprobe"] < DEFAULT_NPROBE  # type: ignore[attr-defined]


@pytest.mark.skipif(not HAS_FAISS, reason="needs faiss")
def test_raising_recall_through_a_worker_and_across_a_restart(
    clustered: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A chain whose faiss worker is raised twice searches with 4x the tuned nprobe; after its
    worker is killed, the restarted worker (which tunes again on build) is set back to the
    raised value, and the recall it reaches is that of the raised search."""
    bank, queries, truth = clustered
    chain = miners.chain("faiss", isolation="process", index="IVF256,Flat", cache_dir=tmp_path)
    try:
        chain.build(bank)
        tuned = chain.build_info["nprobe"]  # type: ignore[attr-defined]
        first = miners.raise_recall(chain)
        assert first == {"nprobe": min(2 * tuned, 256)}
        second = miners.raise_recall(chain)
        assert second == {"nprobe": min(4 * tuned, 256)}
        before = recall_of(chain.search(queries, K)[1], truth)
        worker = chain._miner  # type: ignore[attr-defined]
        worker._worker.kill()  # a real SIGKILL of the worker process
        after = recall_of(chain.search(queries, K)[1], truth)  # restarted, params reapplied
        assert chain.search_params == second  # type: ignore[attr-defined]
        assert after == before
        direct = miners.get("faiss", isolation="none", index="IVF256,Flat", **second)
        direct.build(bank)
        assert recall_of(direct.search(queries, K)[1], truth) == after
    finally:
        chain.close()  # type: ignore[attr-defined]


@pytest.mark.skipif(not HAS_FAISS, reason="needs faiss")
def test_a_user_setting_is_never_raised(
    clustered: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    bank, _, _ = clustered
    fixed = miners.get("faiss", isolation="none", index="IVF64,Flat", nprobe=2)
    fixed.build(bank)
    assert miners.raise_recall(fixed) == {}
    assert fixed.build_info["params"]["nprobe"] == 2  # type: ignore[attr-defined]


# the plain GRU: the residual tower's queries start at bank rows, which HNSW finds at 0.99
RAISE_ARGS = (
    "--no-supervise --backend numpy --residual none --hidden 16 --steps 40 --max-eval 20 "
    "--hard-negatives 2 --miner faiss --faiss-index HNSW4 --faiss-target-recall 0.99 "
    "--mine-every 10 --checkpoint-every 15 --keep-checkpoints 5"
).split()


def faiss_version() -> str:
    import faiss

    return str(faiss.__version__)


@pytest.mark.skipif(not HAS_FAISS, reason="needs faiss")
def test_a_probe_below_target_raises_the_search_and_a_resume_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HNSW4 tuned to 0.99 on bank rows falls short on the training queries: each refresh's
    probe raises efSearch for the next one (in metrics.jsonl and the log). A run killed at step
    25 and resumed from its checkpoint at 15 (efSearch raised once by then) ends bitwise equal
    to the run never killed. The control: a run that keeps the tuned efSearch ends elsewhere.
    Where this faiss build's tuned graph already meets the target on the training queries (the
    premise fails), the test says so and skips."""
    from tests.processes import train_in_child
    from twotower.data import synthesize
    from twotower.run.rundir import read_metrics
    from twotower.training.checkpoint import load_checkpoint

    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    synthesize(data, samples=600, bank=4000, dim=16, seq_len=5, seed=4)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = train_in_child(data, straight, *RAISE_ARGS)
    assert done.returncode == 0, done.stderr
    mined = [r for r in read_metrics(straight / "metrics.jsonl") if r["event"] == "mined"]
    if all(r["recall"] >= 0.99 for r in mined):  # the premise, asked of this faiss build
        pytest.skip(
            f"faiss {faiss_version()}: HNSW4 tuned on bank rows already meets 0.99 on the "
            "training queries (faiss-cpu 1.11 tunes efSearch to 256 here, 1.15 to less), so "
            "there is nothing to raise"
        )
    raised = [r["raised"]["efSearch"] for r in mined if "raised" in r]
    assert len(raised) >= 2 and raised == sorted(raised) and all(r["recall"] < 0.99 for r in mined)
    assert "the next refreshes search with efSearch" in (straight / "log.txt").read_text()
    killed = train_in_child(data, resumed, *RAISE_ARGS, TWOTOWER_INJECT_FAULT="kill@step:25")
    assert killed.returncode != 0
    again = train_in_child(data, resumed, *RAISE_ARGS, "--resume")
    assert again.returncode == 0, again.stderr
    restored = f"searches as the run raised it: {{'efSearch': {raised[0]}}}"
    assert restored in (resumed / "log.txt").read_text()
    expected, state = load_checkpoint(straight)[1], load_checkpoint(resumed)[1]
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    tuned = mined[0]["raised"]["efSearch"] // 2
    kept = train_in_child(data, tmp_path / "kept", *RAISE_ARGS, "--faiss-ef-search", str(tuned))
    assert kept.returncode == 0, kept.stderr
    other = load_checkpoint(tmp_path / "kept")[1]
    assert any(not np.array_equal(other[name], value) for name, value in expected.items())

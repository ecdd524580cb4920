"""Training end to end: it learns, every miner works from the CLI, a crashing miner costs no
step, non-finite steps are skipped, and a stored .npz is trained on without being read whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.processes import REPO, child_env, train_in_child
from twotower import miners
from twotower.config import TrainConfig
from twotower.data import synthesize
from twotower.training.checkpoint import load_checkpoint
from twotower.training.rundir import read_metrics
from twotower.training.trainer import train

SMALL = (
    "--no-supervise --batch-size 16 --hidden 16 --hard-negatives 4 --mine-every 10 "
    "--mine-pool 8 --queue-size 64 --max-eval 50 --backend numpy"
).split()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=800, bank=400, dim=16, seq_len=6, seed=2)
    return path


def events(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == name]


def test_training_learns_and_the_gru_beats_mean_pooling(tmp_path: Path) -> None:
    data = synthesize(tmp_path / "data", samples=6000, bank=3000, dim=32, seq_len=8, seed=3)
    results = {}
    for tower in ("gru", "meanpool"):
        config = TrainConfig(
            data=str(data.path),
            out=str(tmp_path / tower),
            backend="numpy",
            tower=tower,
            hidden=32,
            steps=400,
            lr=3e-3,
            mine_every=200,
            queue_size=256,
            max_eval=500,
            supervise=False,
        )
        results[tower] = train(config)
    chance = 10 / 3000
    gru, meanpool = results["gru"], results["meanpool"]
    assert gru.metrics_before["recall@10"] < 5 * chance
    assert gru.metrics["recall@10"] > 0.5 > 100 * chance
    assert gru.metrics["recall@10"] > meanpool.metrics["recall@10"] + 0.1


@pytest.mark.parametrize("miner", miners.NAMES)
def test_each_miner_trains_from_the_cli(small_data: Path, tmp_path: Path, miner: str) -> None:
    if miner not in miners.available():
        pytest.skip(f"{miner} is not installed")
    out = tmp_path / "run"
    extra = ("--faiss-index", "HNSW16") if miner == "faiss" else ()
    result = train_in_child(small_data, out, "--steps", "25", "--miner", miner, *SMALL, *extra)
    assert result.returncode == 0, result.stderr
    mined = events(out, "mined")
    assert [m["step"] for m in mined] == [10, 20] and {m["miner"] for m in mined} == {miner}
    assert all(m["negatives"] > 0 for m in mined)
    table = np.load(out / "mined" / "table-step-0000020.npy")
    assert (table >= 0).any(axis=1).mean() > 0.9  # every training row (95% of rows) has some


@pytest.mark.skipif(
    not {"faiss", "hnswlib"} <= set(miners.available()), reason="needs faiss, hnswlib"
)
def test_a_segfaulting_miner_costs_no_step(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    faiss_then_others = ("--miner", "faiss", "--miner-fallback", "hnswlib,exact")
    result = train_in_child(
        small_data,
        out,
        "--steps",
        "25",
        *faiss_then_others,
        *SMALL,
        TWOTOWER_INJECT_FAULT="segv@mine:10:faiss",
    )
    assert result.returncode == 0, result.stderr
    crashes = events(out, "miner-crash")
    assert crashes and all("SIGSEGV" in c["how"] and c["step"] == 10 for c in crashes)
    assert events(out, "miner-switch")[0]["miner"] == "hnswlib"
    assert [m["miner"] for m in events(out, "mined")] == ["hnswlib", "hnswlib"]
    assert [s["step"] for s in events(out, "step")] == list(range(1, 26))
    assert load_checkpoint(out)[0]["step"] == 25
    # every death of the worker (two: the first attempt and its restart) leaves a report
    reports = sorted((out / "crashes").glob("miner-faiss-step-0000010-pid*.json"))
    assert len(reports) == 2 == len(crashes)
    assert {c["report"] for c in crashes} == {f"crashes/{r.name}" for r in reports}
    first, second = (json.loads(r.read_text()) for r in reports)
    for report in (first, second):
        assert report["process"] == "miner worker" and report["miner"] == "faiss"
        assert report["exit"]["signal"] == "SIGSEGV"
        assert report["where"]["phase"] == "mine" and report["where"]["step"] == 10
        assert "op_search" in report["stacks"]  # the worker's own faulthandler stack
        assert report["memory"]["peak_rss_kb"] > 10_000
        assert report["openmp"] is None or isinstance(report["openmp"], list)
        assert report["causes"][0]["cause"] == "injected fault segv@mine:10:faiss"
    assert {first["next"], second["next"]} == {"restart faiss", "switch to hnswlib"}
    assert "miner worker (faiss)" in result.stderr and "killed by SIGSEGV" in result.stderr


def test_a_nan_step_is_skipped_and_logged(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_in_child(
        small_data, out, "--steps", "6", *SMALL, TWOTOWER_INJECT_FAULT="nan@step:3"
    )
    assert result.returncode == 0, result.stderr
    skipped = events(out, "nonfinite")
    assert [s["step"] for s in skipped] == [4] and not np.isfinite(skipped[0]["loss"])
    assert [s["step"] for s in events(out, "step")] == [1, 2, 3, 5, 6]
    assert "update skipped" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_stored_npz_is_trained_on_without_being_read(tmp_path: Path) -> None:
    """A 300 MB np.savez of vectors: the trainer's anonymous memory grows far less than that."""
    source = synthesize(
        tmp_path / "dir", samples=10_000, bank=2000, dim=768, seq_len=10, layout="contexts"
    )
    npz = tmp_path / "data.npz"
    np.savez(
        npz,
        bank=source.bank,
        contexts=source.contexts,
        lengths=source.lengths,
        positives=source.positives,
    )
    size_mb = npz.stat().st_size / 1e6
    script = f"""
import json, sys
from twotower.config import TrainConfig
from twotower.training.trainer import train
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
before = anon_mb()
config = TrainConfig(data={str(npz)!r}, out={str(tmp_path / "run")!r}, backend="numpy",
                     hidden=32, steps=60, mine_every=30, queue_size=256, max_eval=500,
                     supervise=False)
result = train(config)
print(json.dumps({{"before": before, "after": anon_mb(), "steps": result.steps}}))
"""
    child = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    assert measured["steps"] == 60
    growth = measured["after"] - measured["before"]
    assert growth < 0.25 * size_mb, (
        f"RssAnon grew {growth:.0f} MB training on a {size_mb:.0f} MB npz"
    )


@pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")
def test_evaluation_with_faiss_flat_gives_the_exact_numbers(
    small_data: Path, tmp_path: Path
) -> None:
    """--eval-miner faiss (Flat, in its worker) must report what exact search reports."""
    runs = {}
    for miner in ("exact", "faiss"):
        runs[miner] = tmp_path / miner
        args = ("--steps", "12", "--eval-every", "6", "--eval-miner", miner, *SMALL)
        assert train_in_child(small_data, runs[miner], *args).returncode == 0
    exact, faiss = (events(runs[m], "eval") for m in ("exact", "faiss"))
    assert [e["step"] for e in exact] == [0, 6, 12]
    for mine, theirs in zip(exact, faiss, strict=True):
        timing = ("time", "seconds")
        assert {k: v for k, v in mine.items() if k not in timing} == {
            k: v for k, v in theirs.items() if k not in timing
        }


def test_a_mine_fault_does_not_fire_in_evaluation(small_data: Path, tmp_path: Path) -> None:
    """Evaluation searches too, but it is not mining: an engine-less mine fault at an eval step
    of a run that never mines must not fire."""
    out = tmp_path / "run"
    args = ("--steps", "12", "--eval-every", "6", *SMALL, "--hard-negatives", "0")
    result = train_in_child(small_data, out, *args, TWOTOWER_INJECT_FAULT="segv@mine:6")
    assert result.returncode == 0, result.stderr
    assert [e["step"] for e in events(out, "eval")] == [0, 6, 12]
    assert not any((out / "faults").glob("*"))


def independent_recall(q: np.ndarray, bank: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """recall@1/10/100 and MRR@100 by a float64 brute-force search written here."""
    scores = q @ np.asarray(bank, dtype=np.float64).T
    positive_scores = scores[np.arange(len(q)), positives]
    rank = (scores > positive_scores[:, None]).sum(axis=1)  # 0 = first
    metrics = {f"recall@{c}": float(np.mean(rank < c)) for c in (1, 10, 100)}
    metrics["mrr@100"] = float(np.mean(np.where(rank < 100, 1.0 / (rank + 1), 0.0)))
    return metrics


def printed_metrics(out: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("tower", ["gru", "meanpool-no-proj"])
def test_eval_reports_what_an_independent_search_finds(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tower: str
) -> None:
    import reference
    from twotower.cli import main
    from twotower.data import load_dataset
    from twotower.training.heldout import held_out_split

    dataset = load_dataset(small_data)
    _, rows = held_out_split(dataset.num_samples, 0.05, 2000, 0)
    contexts, lengths, positives = dataset.gather(rows)
    if tower == "gru":
        out = tmp_path / "run"
        train(
            TrainConfig(
                data=str(small_data),
                out=str(out),
                backend="numpy",
                hidden=16,
                steps=300,
                lr=3e-3,
                supervise=False,
            )
        )
        _, state = load_checkpoint(out)
        params = {k: v for k, v in state.items() if k.startswith(("gru.", "proj."))}
        q = reference.encode("gru", params, contexts, lengths)
        args = ["eval", "--run", str(out), "--backend", "numpy"]
    else:
        q = reference.encode("meanpool", {}, contexts, lengths)
        args = ["eval", "--data", str(small_data), "--tower", "meanpool", "--no-proj"]
    capsys.readouterr()
    assert main(args) == 0
    reported = printed_metrics(capsys.readouterr().out)
    expected = independent_recall(q, dataset.bank, positives)
    assert set(reported) == set(expected)
    for name, value in expected.items():  # float32 vs float64 may swap a near-tie: one query
        assert abs(reported[name] - value) <= 1 / len(rows) + 1e-4, name
    if tower == "gru":
        assert reported["recall@10"] > 0.3  # trained: the comparison is not between zeros

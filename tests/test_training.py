"""Training end to end: it learns, every miner works from the CLI, a crashing miner costs no
step, non-finite steps are skipped, and a stored .npz is trained on without being read whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.neighbours import independent_recall
from tests.processes import REPO, child_env, train_in_child
from twotower import miners
from twotower.config import TrainConfig
from twotower.data import synthesize
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint
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
    # the upcoming scope: exactly the rows of steps 20..29 (distinct within epoch 0) have some
    assert np.count_nonzero((table >= 0).any(axis=1)) == 10 * 16
    if miner != "exact":
        assert all(m["recall_k"] == 8 and 0 <= m["recall"] <= 1 for m in mined)


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
        TWOTOWER_INJECT_FAULT="segv@mine:8:faiss",  # the refresh used at 10 is taken at 8
    )
    assert result.returncode == 0, result.stderr
    crashes = events(out, "miner-crash")
    assert crashes and all("SIGSEGV" in c["how"] and c["step"] == 8 for c in crashes)
    assert events(out, "miner-switch")[0]["miner"] == "hnswlib"
    assert [m["miner"] for m in events(out, "mined")] == ["hnswlib", "hnswlib"]
    assert [s["step"] for s in events(out, "step")] == list(range(1, 26))
    assert load_checkpoint(out)[0]["step"] == 25
    # every death of the worker (two: the first attempt and its restart) leaves a report
    reports = sorted((out / "crashes").glob("miner-faiss-step-0000008-pid*.json"))
    assert len(reports) == 2 == len(crashes)
    assert {c["report"] for c in crashes} == {f"crashes/{r.name}" for r in reports}
    first, second = (json.loads(r.read_text()) for r in reports)
    for report in (first, second):
        assert report["process"] == "miner worker" and report["miner"] == "faiss"
        assert report["exit"]["signal"] == "SIGSEGV"
        assert report["where"]["phase"] == "mine" and report["where"]["step"] == 8
        assert "op_search" in report["stacks"]  # the worker's own faulthandler stack
        assert report["memory"]["peak_rss_kb"] > 10_000
        assert report["openmp"] is None or isinstance(report["openmp"], list)
        assert report["causes"][0]["cause"] == "injected fault segv@mine:8:faiss"
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


def independent_baselines(contexts: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The parameter-free queries in float64: the last real context vector, the context mean."""
    x = contexts.astype(np.float64)
    last = x[np.arange(len(x)), lengths - 1]
    mean = np.stack([x[i, : lengths[i]].mean(axis=0) for i in range(len(x))])
    return {
        "last item": last / np.linalg.norm(last, axis=1, keepdims=True),
        "context mean": mean / np.linalg.norm(mean, axis=1, keepdims=True),
    }


def printed_table(out: str) -> dict[str, dict[str, float]]:
    """`twotower eval`'s table: {column (tower, last item, context mean): {metric: value}}."""
    columns = ("tower", "last item", "context mean")
    table: dict[str, dict[str, float]] = {column: {} for column in columns}
    for line in out.splitlines():
        name, *values = line.split()
        if name.startswith(("recall@", "mrr@")) and len(values) == 3:
            for column, value in zip(columns, values, strict=True):
                table[column][name] = float(value)
    return table


def assert_reports(reported: dict[str, float], expected: dict[str, float], rows: int) -> None:
    assert set(reported) == set(expected)
    for name, value in expected.items():  # float32 vs float64 may swap a near-tie: one query
        assert abs(reported[name] - value) <= 1 / rows + 1e-4, name


@pytest.mark.parametrize("tower", ["gru", "meanpool-no-proj"])
def test_eval_reports_what_an_independent_search_finds(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tower: str
) -> None:
    import reference
    from twotower.cli import main
    from twotower.data import load_dataset
    from twotower.training.evaluation.heldout import held_out_split

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
                residual="none",  # the plain GRU the test encodes with, ranked unmasked
                exclude_context=False,
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
        args.append("--no-exclude-context")  # the data has ids: masking would be the default
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    reported = printed_table(printed)
    assert_reports(reported["tower"], independent_recall(q, dataset.bank, positives), len(rows))
    for name, baseline in independent_baselines(contexts, lengths).items():
        found = independent_recall(baseline, dataset.bank, positives)
        assert_reports(reported[name], found, len(rows))
    if tower == "gru":
        assert reported["tower"]["recall@10"] > 0.3  # trained: the comparison is not between zeros
        assert reported["tower"]["mrr@100"] > reported["last item"]["mrr@100"]
        assert "lift " in printed and "beats the tower" not in printed
    else:  # the tower is the context-mean baseline itself
        assert reported["tower"] == reported["context mean"]


def test_eval_ranks_every_row_of_a_test_set_without_its_context(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rows all on another dataset with --exclude-context: every row, each query's own
    context items masked out of the ranking (the positive excepted) for tower and baselines."""
    import reference
    from twotower.cli import main

    out = tmp_path / "run"
    config = TrainConfig(
        data=str(small_data),
        out=str(out),
        backend="numpy",
        hidden=16,
        steps=60,
        residual="none",  # the plain GRU the test encodes with
        supervise=False,
    )
    train(config)
    test = synthesize(tmp_path / "test", samples=120, bank=400, dim=16, seq_len=6, seed=7)
    assert test.context_ids is not None
    rows = np.arange(test.num_samples)
    contexts, lengths, positives = test.gather(rows)
    seen = np.where(np.arange(6)[None, :] < lengths[:, None], test.context_ids[rows], -1)
    # the positive: the bank row nearest the last item but for the context items themselves
    # (so only masking lets the last-item baseline find it first) ...
    scores = contexts[np.arange(len(rows)), lengths - 1] @ test.bank.T
    for i, ids in enumerate(seen):
        scores[i, ids[ids >= 0]] = -np.inf
    positives = scores.argmax(axis=1)
    positives[:5] = seen[:5, 0]  # ... or, for 5 rows, one inside its own context: never masked
    np.save(test.path / "positives.npy", positives)
    _, state = load_checkpoint(out, which="best")
    q = reference.encode("gru", state, contexts, lengths)
    args = ["eval", "--run", str(out), "--checkpoint", "best", "--backend", "numpy"]
    capsys.readouterr()
    assert main([*args, "--data", str(test.path), "--rows", "all", "--exclude-context"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(rows)} queries of {test.path} (every row)" in printed
    reported = printed_table(printed)
    assert_reports(reported["tower"], independent_recall(q, test.bank, positives, seen), len(rows))
    unmasked = {}
    for name, baseline in independent_baselines(contexts, lengths).items():
        assert_reports(
            reported[name], independent_recall(baseline, test.bank, positives, seen), len(rows)
        )
        unmasked[name] = independent_recall(baseline, test.bank, positives)
    # masked, the last item finds every positive first; unmasked it finds itself (the
    # negative control: what is reported is the masked ranking)
    assert reported["last item"]["recall@1"] >= 0.95
    assert unmasked["last item"]["recall@1"] <= 5 / len(rows)


def test_a_planned_run_that_never_mines_says_so_at_start(small_data: Path, tmp_path: Path) -> None:
    """12 planned steps at the default --mine-every 500: no refresh is ever in use, and the
    log says so at the start with the flag to change; likewise for --eval-every 20."""
    base = dict(data=str(small_data), backend="numpy", hidden=8, steps=12, supervise=False)
    train(TrainConfig(**base, out=str(tmp_path / "never"), eval_every=20, max_eval=20))
    log_text = (tmp_path / "never" / "log.txt").read_text()
    assert (
        "no hard negatives: the 12 planned steps end before the first refresh, at step 500 "
        "(--mine-every, the default); pass --mine-every N with N < 12 to mine" in log_text
    )
    assert (
        "no evaluation between the start and the end: the 12 planned steps end before the "
        "first, at step 20" in log_text
    )
    assert "evaluating every 20 steps (as --eval-every says)" in log_text
    assert not events(tmp_path / "never", "mined")
    # negative control: a plan that reaches a refresh says nothing of the kind, and mines
    train(TrainConfig(**base, out=str(tmp_path / "mines"), mine_every=5, max_eval=20))
    log_text = (tmp_path / "mines" / "log.txt").read_text()
    assert "no hard negatives" not in log_text and "no evaluation between" not in log_text
    assert [r["step"] for r in events(tmp_path / "mines", "mined")] == [5, 10]


def test_the_demo_with_fewer_steps_than_its_mining_cadence_warns() -> None:
    """`--demo --miner faiss --steps 300`: the demo mines every 400 steps, so faiss would never
    be called; the warning names the demo's setting, and the evaluation line does not claim
    the user asked for --eval-every."""
    from twotower.cli import build_parser, config_from_args
    from twotower.training.evaluation.cadence import plan_gaps, said_by

    args = build_parser().parse_args("train --demo --miner faiss --steps 300".split())
    config = config_from_args(args)
    (mining, _) = plan_gaps(config, 300, config.eval_every or 0)
    assert "at step 400 (--mine-every, the demo's setting); --miner faiss is never used" in mining
    assert said_by(config, "eval_every") == "the demo's setting"
    asked = config_from_args(build_parser().parse_args("train --demo --eval-every 50".split()))
    assert said_by(asked, "eval_every") == "as --eval-every says"
    assert said_by(asked, "mine_every") == "the demo's setting"
    assert said_by(TrainConfig(data="d"), "mine_every") == "the default"


def test_a_stop_between_evaluations_evaluates_for_the_summary_only(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after step 7 of 12 (evaluations every 5): the stop evaluates at 7 for the
    summary, but model selection never sees it, so the resumed run keeps best/ and ends
    bitwise where the run never stopped does."""
    from twotower.training.setup import open_run
    from twotower.training.trainer import Trainer

    def config(out: str, resume: bool = False) -> TrainConfig:
        return TrainConfig(
            data=str(small_data),
            out=str(tmp_path / out),
            backend="numpy",
            hidden=8,
            steps=12,
            eval_every=5,
            max_eval=30,
            mine_every=4,
            supervise=False,
            resume=resume,
        )

    straight = train(config("straight"))
    opened = open_run(config("run"), None)
    stopping = Trainer(opened)
    monkeypatch.setattr(stopping, "_stop_requested", lambda: stopping.steps_done == 7)
    try:
        stopped = stopping.train()
    finally:
        opened.close()
    assert (stopped.exit_code, stopped.steps) == (130, 7)
    evals = events(tmp_path / "run", "eval")
    assert [(r["step"], r.get("selected", True)) for r in evals] == [
        (0, True),
        (5, True),
        (7, False),
    ]
    assert stopped.metrics == {k: evals[-1][k] for k in stopped.metrics}
    log_text = (tmp_path / "run" / "log.txt").read_text()
    assert "recall@10 at step 0: " in log_text and ", at step 7: " in log_text
    assert log_text.rstrip().endswith(
        f"resume with: twotower train --out {tmp_path / 'run'} --resume"
    )

    resumed = train(config("run", resume=True))
    assert resumed.steps == 12
    for which in ("latest", "best"):
        meta, state = load_checkpoint(tmp_path / "run", which=which)
        expected_meta, expected = load_checkpoint(tmp_path / "straight", which=which)
        assert meta["step"] == expected_meta["step"], which
        for name, value in expected.items():
            np.testing.assert_array_equal(state[name], value, err_msg=f"{which}: {name}")
    assert straight.best_step == resumed.best_step

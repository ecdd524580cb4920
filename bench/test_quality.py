"""Quality benchmark: next-paragraph retrieval over real MiniLM embeddings of man pages
(bench/quality/build_dataset.py), test sequences from pages no training row comes from,
every test row ranked against the whole bank. Opt-in (minutes of CPU per case):

    TWOTOWER_BENCH_QUALITY=1 OMP_NUM_THREADS=1 python -m pytest bench/test_quality.py [-k CASE]

(OMP_NUM_THREADS=1 on a shared machine: there, torch's two OpenMP threads spin-wait for
each other and a step took 24x as long as with one, 793 vs 33 ms, measured side by side.)

Rows: the parameter-free baselines (last context item, context mean), a plain hand-written
PyTorch GRU loop with in-batch negatives (bench/quality/plain_loop.py), and twotower with the
recipe options switched on one after another, then hard negatives off / on / on with the
false-negative filters. Every trained row runs the same number of epochs with a GRU of hidden
size 384 (the default 768 takes 2.4x the compute on a shared 2-core machine). Columns: test
recall@10 and MRR@100 of the parameters in RUN/best/ and of the final ones, the held-out
MRR@100 training selected on, and wall seconds (the machine may be shared: compare within
one run only). Every test ranking drops the query's own context items (the positive
excepted), so a baseline cannot score its own last item. The table is printed and saved to
.benchmarks/quality.json and .benchmarks/quality.md.

TWOTOWER_BENCH_QUALITY_SEEDS=1,2 adds, per seed, the defaults and the plain loop trained
with that seed (`test_seed`; every other row is seed 0): whether the gap between them
is larger than what a seed moves.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.quality.build_dataset import build, default_out
from twotower import miners
from twotower.config import TrainConfig
from twotower.data import Dataset, load_dataset
from twotower.training.eval_command import evaluate_run
from twotower.training.evaluation import BASELINES, baseline_queries, rank_rows
from twotower.training.trainer import train

pytestmark = pytest.mark.skipif(
    os.environ.get("TWOTOWER_BENCH_QUALITY") != "1",
    reason="the quality benchmark is opt-in: TWOTOWER_BENCH_QUALITY=1",
)

EPOCHS = int(os.environ.get("TWOTOWER_BENCH_QUALITY_EPOCHS", "4"))
HIDDEN = 384  # every GRU here, the plain loop's too: a 768 one takes 2.4x the compute
OLD = {  # the recipe before the options existed: the starting point
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "residual": "none",
    "exclude_context": False,
    "hard_negatives": 8,
}
SCHEDULE = {"lr_schedule": "cosine", "warmup_steps": None, "warmup_share": 0.05}
RESIDUAL = {"residual": "last"}
EXCLUDE = {"exclude_context": True}
FULL = {**OLD, **SCHEDULE, **RESIDUAL, **EXCLUDE}
CASES: dict[str, dict[str, Any]] = {
    "old recipe (constant lr, GRU, K=8, Q=4096)": OLD,
    "+ linear decay, 5% warm-up": {**OLD, **SCHEDULE, "lr_schedule": "linear"},
    "+ cosine decay, 5% warm-up": {**OLD, **SCHEDULE},
    "+ cosine + exclude-context (no residual)": {**OLD, **SCHEDULE, **EXCLUDE},
    "+ cosine + residual last": {**OLD, **SCHEDULE, **RESIDUAL},
    "+ cosine + residual + exclude-context (K=8)": FULL,
    "full, hard negatives off (K=0)": {**FULL, "hard_negatives": 0},
    "full, K=8 skip 10 + relative margin 0.05": {
        **FULL,
        "mine_skip": 10,
        "relative_margin": 0.05,
    },
    "full, random split (leaky held-out)": {**FULL, "eval_split": "random"},
    "defaults (--data --epochs only)": {},
}


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset]:
    """(train, test) of the benchmark dataset, built first if it is not in the cache."""
    root = default_out()
    if not (root / "build.json").is_file():
        build(root, items=10000, seq_len=5)
    return load_dataset(root / "train"), load_dataset(root / "test")


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, Any]]]:
    """Rows by case; printed and saved when the module ends."""
    rows: dict[str, dict[str, Any]] = {}
    yield rows
    lines = [
        f"epochs: {EPOCHS}, hidden {HIDDEN}; test: every row of unseen pages, full bank",
        "",
        "| case | test R@10 (best/) | test MRR@100 (best/) | test MRR@100 (final) "
        "| held-out MRR@100 (best) | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case, row in rows.items():
        cells = [
            row.get("r10_best", row.get("r10")),
            row.get("mrr_best", row.get("mrr")),
            row.get("mrr_final"),
            row.get("heldout_best"),
            row.get("seconds"),
        ]
        text = ["" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells]
        lines.append(f"| {case} | " + " | ".join(text) + " |")
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        terminal = plugins.get_plugin("terminalreporter")
        for line in ["", *lines]:
            terminal.write_line(line)
    out = Path(".benchmarks")
    out.mkdir(exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"epochs": EPOCHS, "rows": rows}, indent=2))
    (out / "quality.md").write_text("\n".join(lines) + "\n")


def exact(dataset: Dataset) -> miners.Miner:
    miner = miners.get("exact", fault_phase=None)
    miner.build(dataset.bank, fingerprint=dataset.fingerprint)
    return miner


@pytest.mark.parametrize("name", BASELINES)
def test_baseline(name: str, data: tuple[Dataset, Dataset], table: dict) -> None:
    _, test = data
    rows = np.arange(test.num_samples)
    metrics = rank_rows(
        lambda c, n: baseline_queries(name, c, n), test, rows, exact(test), exclude_context=True
    )
    table[name] = {"r10": metrics["recall@10"], "mrr": metrics["mrr@100"]}


def plain_loop_row(data: tuple[Dataset, Dataset], seed: int) -> dict[str, Any]:
    """Train the plain loop with `seed` on the training rows; its row of the table."""
    from bench.quality.plain_loop import encoder, train_plain_gru

    train_data, test = data
    assert train_data.context_ids is not None
    started = time.perf_counter()
    model = train_plain_gru(
        np.asarray(train_data.bank),
        np.asarray(train_data.context_ids),
        np.asarray(train_data.lengths),
        np.asarray(train_data.positives),
        epochs=EPOCHS,
        hidden=HIDDEN,
        seed=seed,
    )
    seconds = time.perf_counter() - started
    rows = np.arange(test.num_samples)
    metrics = rank_rows(encoder(model), test, rows, exact(test), exclude_context=True)
    return {"r10": metrics["recall@10"], "mrr_final": metrics["mrr@100"], "seconds": round(seconds)}


def twotower_row(data: tuple[Dataset, Dataset], out: Path, **settings: Any) -> dict[str, Any]:
    """Train twotower with `settings` into `out`; its row of the table (best/ and the final
    parameters on every test row)."""
    train_data, test = data
    config = TrainConfig(
        data=str(train_data.path),
        out=str(out),
        epochs=EPOCHS,
        hidden=HIDDEN,
        backend="torch-cpu",
        supervise=False,
        **settings,
    )
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    assert result.exit_code == 0
    best, final = on_test(out, test, "best"), on_test(out, test, "latest")
    return {
        "r10_best": best["recall@10"],
        "mrr_best": best["mrr@100"],
        "mrr_final": final["mrr@100"],
        "heldout_best": result.best_metrics.get("mrr@100"),
        "best_step": result.best_step,
        "steps": result.steps,
        "seconds": round(seconds),
    }


def on_test(run: Path, test: Dataset, which: str) -> dict[str, float]:
    """The metrics of RUN's `which` checkpoint ("best", "latest") on every test row."""
    return evaluate_run(
        run=str(run),
        data=str(test.path),
        rows="all",
        checkpoint=which,
        exclude_context=True,
        backend="torch-cpu",
    ).comparison.model


def test_plain_gru_loop(data: tuple[Dataset, Dataset], table: dict) -> None:
    table["plain PyTorch GRU loop (in-batch only)"] = plain_loop_row(data, seed=0)


@pytest.mark.parametrize("case", list(CASES))
def test_twotower(case: str, data: tuple[Dataset, Dataset], table: dict, tmp_path: Path) -> None:
    table[case] = twotower_row(data, tmp_path / "run", **CASES[case])


SEEDS = os.environ.get("TWOTOWER_BENCH_QUALITY_SEEDS", "")


@pytest.mark.parametrize("seed", [int(seed) for seed in SEEDS.split(",") if seed])
def test_seed(seed: int, data: tuple[Dataset, Dataset], table: dict, tmp_path: Path) -> None:
    """The plain loop and the defaults, both trained with `seed`."""
    table[f"plain PyTorch GRU loop, seed {seed}"] = plain_loop_row(data, seed)
    table[f"defaults, seed {seed}"] = twotower_row(data, tmp_path / "run", seed=seed)

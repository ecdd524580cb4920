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
recall@1/10/100 and MRR@100 of the parameters in RUN/best/, MRR of the final ones, the held-out
MRR@100 training selected on, and wall seconds (the machine may be shared: compare within
one run only). Every row is ranked twice: "masked" drops the query's own context items (the
positive excepted), so a baseline cannot score its own last item; "full-bank" does not.
The table is printed and saved to .benchmarks/quality.json and .benchmarks/quality.md.

Issue 18's rows (`-k test_bank_negatives`): no bank negatives, the full softmax over the bank,
S=1k and 8k sampled rows (after K=8 and Q=4096), each with the plain GRU and with the residual
tower (the default), and logQ; TWOTOWER_BENCH_QUALITY_BANK_SEEDS=0,1,2 trains each with those
seeds. TWOTOWER_QUALITY_DATA=DIR reads another corpus (`build_dataset --corpus docs --out DIR`).
Each trainer runs on one thread (TWOTOWER_BENCH_QUALITY_THREADS): its default, every core,
does not read OMP_NUM_THREADS. TWOTOWER_BENCH_QUALITY_OUT names the table's files.

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
from twotower.config import METRICS, TrainConfig
from twotower.data import Dataset, load_dataset
from twotower.training.evaluation.command import evaluate_run
from twotower.training.evaluation.metrics import BASELINES, baseline_queries, rank_rows
from twotower.training.trainer import train

pytestmark = pytest.mark.skipif(
    os.environ.get("TWOTOWER_BENCH_QUALITY") != "1",
    reason="the quality benchmark is opt-in: TWOTOWER_BENCH_QUALITY=1",
)

EPOCHS = int(os.environ.get("TWOTOWER_BENCH_QUALITY_EPOCHS", "4"))
# one trainer thread unless told: the trainer's default (every core) ignores OMP_NUM_THREADS, and
# two torch threads on a shared machine spin-wait for each other (see the module docstring)
THREADS = int(os.environ.get("TWOTOWER_BENCH_QUALITY_THREADS", "1"))
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
# issue 18: negatives from the whole bank, each with the plain GRU and the residual tower (the
# GRU's default since); the rest of the recipe is today's defaults (K=8 mined, Q=4096 queue: the
# sampled rows come after them)
NONE = {"bank_negatives": "none"}
PLAIN = {"residual": "none"}
BANK_CASES: dict[str, dict[str, Any]] = {
    f"{name}, {'residual tower' if residual else 'plain GRU'}": {
        **settings,
        **(RESIDUAL if residual else PLAIN),
    }
    for residual in (False, True)
    for name, settings in {
        "no bank negatives": NONE,
        "full softmax over the bank": {"bank_negatives": "full"},
        "sampled S=1k": {"bank_negatives": "sampled", "sampled_negatives": 1024},
        "sampled S=8k": {"bank_negatives": "sampled", "sampled_negatives": 8192},
    }.items()
}
BANK_CASES["logQ on in-batch and queue, no bank negatives, residual tower"] = {**NONE, "logq": True}
BANK_SEEDS = [int(s) for s in os.environ.get("TWOTOWER_BENCH_QUALITY_BANK_SEEDS", "0").split(",")]


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset]:
    """(train, test) of the benchmark dataset, built first if it is not in the cache."""
    root = default_out()
    if not (root / "build.json").is_file():
        build(root, items=10000, seq_len=5)
    return load_dataset(root / "train"), load_dataset(root / "test")


COLUMNS = [f"{scope} {metric}" for scope in ("masked", "full-bank") for metric in METRICS]


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, Any]]]:
    """Rows by case; printed and saved when the module ends (as $TWOTOWER_BENCH_QUALITY_OUT
    .json/.md, default .benchmarks/quality: two runs side by side keep their own)."""
    rows: dict[str, dict[str, Any]] = {}
    yield rows
    lines = [
        f"epochs: {EPOCHS}, hidden {HIDDEN}; test: every row of unseen pages, full bank; "
        "masked: the query's own context items dropped from the ranking (the positive "
        "excepted); metrics of best/ (held-out MRR selection), MRR@100",
        "",
        "| case | " + " | ".join(COLUMNS) + " | masked MRR (final) | steps | seconds |",
        "| --- " * (len(COLUMNS) + 4) + "|",
    ]
    for case, row in rows.items():
        cells = [row.get(c) for c in COLUMNS] + [row.get("mrr_final"), row.get("steps")]
        text = ["" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells]
        lines.append(f"| {case} | " + " | ".join(text) + f" | {row.get('seconds', '')} |")
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        terminal = plugins.get_plugin("terminalreporter")
        for line in ["", *lines]:
            terminal.write_line(line)
    out = Path(os.environ.get("TWOTOWER_BENCH_QUALITY_OUT", ".benchmarks/quality"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"epochs": EPOCHS, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def both_scopes(ranked: Any) -> dict[str, float]:
    """`ranked(exclude_context)` -> metrics, under both masks, keyed as COLUMNS."""
    row = {}
    for scope, masked in (("masked", True), ("full-bank", False)):
        metrics = ranked(masked)
        row.update({f"{scope} {metric}": metrics[metric] for metric in METRICS})
    return row


def exact(dataset: Dataset) -> miners.Miner:
    miner = miners.get("exact", fault_phase=None)
    miner.build(dataset.bank, fingerprint=dataset.fingerprint)
    return miner


@pytest.mark.parametrize("name", BASELINES)
def test_baseline(name: str, data: tuple[Dataset, Dataset], table: dict) -> None:
    _, test = data
    rows = np.arange(test.num_samples)
    miner = exact(test)
    table[name] = both_scopes(
        lambda masked: rank_rows(
            lambda c, n: baseline_queries(name, c, n), test, rows, miner, exclude_context=masked
        )
    )


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
    miner = exact(test)
    row = both_scopes(
        lambda masked: rank_rows(encoder(model), test, rows, miner, exclude_context=masked)
    )
    return {**row, "seconds": round(seconds)}


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
        threads=THREADS,
        **settings,
    )
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    assert result.exit_code == 0
    row = both_scopes(lambda masked: on_test(out, test, "best", masked))
    return {
        **row,
        "mrr_final": on_test(out, test, "latest", True)["mrr@100"],
        "heldout_best": result.best_metrics.get("mrr@100"),
        "best_step": result.best_step,
        "steps": result.steps,
        "seconds": round(seconds),
    }


def on_test(run: Path, test: Dataset, which: str, masked: bool) -> dict[str, float]:
    """The metrics of RUN's `which` checkpoint ("best", "latest") on every test row, its own
    context items dropped from each ranking when `masked`."""
    return evaluate_run(
        run=str(run),
        data=str(test.path),
        rows="all",
        checkpoint=which,
        exclude_context=masked,
        backend="torch-cpu",
    ).comparison.model


def test_plain_gru_loop(data: tuple[Dataset, Dataset], table: dict) -> None:
    table["plain PyTorch GRU loop (in-batch only)"] = plain_loop_row(data, seed=0)


@pytest.mark.parametrize("case", list(CASES))
def test_twotower(case: str, data: tuple[Dataset, Dataset], table: dict, tmp_path: Path) -> None:
    table[case] = twotower_row(data, tmp_path / "run", **CASES[case])


@pytest.mark.parametrize("seed", BANK_SEEDS)
@pytest.mark.parametrize("case", list(BANK_CASES))
def test_bank_negatives(
    case: str, seed: int, data: tuple[Dataset, Dataset], table: dict, tmp_path: Path
) -> None:
    """Issue 18's rows (TWOTOWER_BENCH_QUALITY_BANK_SEEDS=0,1,2 for more seeds)."""
    row = twotower_row(data, tmp_path / "run", seed=seed, **BANK_CASES[case])
    table[f"{case}, seed {seed}"] = row


SEEDS = os.environ.get("TWOTOWER_BENCH_QUALITY_SEEDS", "")


@pytest.mark.parametrize("seed", [int(seed) for seed in SEEDS.split(",") if seed])
def test_seed(seed: int, data: tuple[Dataset, Dataset], table: dict, tmp_path: Path) -> None:
    """The plain loop and the defaults, both trained with `seed`."""
    table[f"plain PyTorch GRU loop, seed {seed}"] = plain_loop_row(data, seed)
    table[f"defaults, seed {seed}"] = twotower_row(data, tmp_path / "run", seed=seed)

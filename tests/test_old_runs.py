"""A run made by an older twotower is read as that version meant it: eval, export then encode,
resume, replay and report, each compared with what the run logged.

tests/fixtures/old_runs/run-a60e82e/ is a whole run (config.json, metrics.jsonl, its one
checkpoint) and its data, made by the code of a60e82e^, before --residual, --lr-schedule,
--exclude-context, --eval-split, --mine-scope and --mine-lead existed: its config.json has
none of those keys. The code before issue 27 evaluated it as a residual tower on another split
(mrr@100 0.1034); it logged 0.1565 at step 24. Made with:
  twotower synth --out data --samples 600 --bank 300 --dim 16 --seq-len 6 --seed 3
  twotower train --data data --out run --backend numpy --steps 24 --batch-size 16 --hidden 12
    --hard-negatives 0 --queue-size 32 --lr 2e-2 --eval-every 24 --checkpoint-every 24
    --keep-checkpoints 1 --eval-fraction 0.2 --max-eval 120 --no-supervise
tests/fixtures/old_runs/export-51f7819/ is that run exported by the code of 51f7819^.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import twotower
from tests.processes import run_twotower
from twotower.data import load_dataset
from twotower.run.rundir import read_metrics
from twotower.run.settings import read_run_config
from twotower.serve.export import export_tower
from twotower.training.evaluation.heldout import held_out

GOLDEN = Path(__file__).parent / "fixtures" / "old_runs" / "run-a60e82e"
LOGGED_STEP = 24


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    """A copy of the golden run and its data (config.json names them relative: data, run)."""
    shutil.copytree(GOLDEN, tmp_path, dirs_exist_ok=True)
    return tmp_path


def logged_mrr(run: Path) -> float:
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "eval"]
    return next(r["mrr@100"] for r in evals if r["step"] == LOGGED_STEP)


def test_eval_prints_the_mrr_the_old_run_logged(old_run: Path) -> None:
    shown = run_twotower("eval", "--run", "run", "--checkpoint", "latest", cwd=old_run)
    assert shown.returncode == 0, shown.stderr
    found = re.search(r"^mrr@100\s+(\S+)", shown.stdout, re.MULTILINE)
    assert found, shown.stdout
    assert float(found.group(1)) == pytest.approx(logged_mrr(old_run / "run"), abs=5e-5)


def independent_mrr(queries: np.ndarray, bank: np.ndarray, positives: np.ndarray) -> float:
    """MRR@100 by a float64 ranking of the whole bank, written here (ties rank first)."""
    scores = queries.astype(np.float64) @ bank.astype(np.float64).T
    mine = scores[np.arange(len(positives)), positives]
    ranks = 1 + (scores > mine[:, None]).sum(axis=1)
    return float(np.where(ranks <= 100, 1.0 / ranks, 0.0).mean())


def mrr_of_tower(old_run: Path, tower_dir: Path) -> tuple[float, int]:
    """(MRR@100 of an exported tower on the old run's held-out rows, how many rows)."""
    tower = twotower.load_tower(tower_dir, engine="numpy")
    config = read_run_config(old_run / "run")
    dataset = load_dataset(old_run / str(config.data))
    rows = held_out(config, dataset).eval_rows
    contexts, lengths, positives = dataset.gather(rows)
    queries = tower.encode(contexts, lengths)
    return independent_mrr(queries, np.asarray(dataset.bank), positives), len(rows)


def test_an_export_of_the_old_run_encodes_what_it_logged(
    old_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(old_run)
    out = export_tower("run", old_run / "tower", checkpoint="latest")
    found, rows = mrr_of_tower(old_run, out)
    assert found == pytest.approx(logged_mrr(old_run / "run"), abs=1 / rows)


def test_an_export_made_by_an_older_version_encodes_what_the_run_logged(old_run: Path) -> None:
    """tests/fixtures/old_runs/export-51f7819: the golden run exported by the code of 51f7819^,
    before exports computed the residual tower."""
    found, rows = mrr_of_tower(old_run, GOLDEN.parent / "export-51f7819")
    assert found == pytest.approx(logged_mrr(old_run / "run"), abs=1 / rows)


def test_the_old_run_resumes(old_run: Path) -> None:
    resumed = run_twotower("train", "--out", "run", "--resume", "--steps", "30", cwd=old_run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-0000024" in resumed.stderr
    records = read_metrics(old_run / "run" / "metrics.jsonl")
    new_steps = [r["step"] for r in records if r["event"] == "step" and r["step"] > LOGGED_STEP]
    assert new_steps == list(range(LOGGED_STEP + 1, 31))


def test_replay_rebuilds_a_step_of_the_old_run_as_it_logged_it(old_run: Path) -> None:
    replay = run_twotower(
        "replay", "--run", "run", "--step", "20", "--backends", "numpy", cwd=old_run
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    logged = next(
        r
        for r in read_metrics(old_run / "run" / "metrics.jsonl")
        if r["event"] == "step" and r["step"] == 21
    )
    assert f"batch {logged['batch']} " in replay.stdout and "is the logged one" in replay.stdout
    assert f"logged {logged['loss']:.8f}: the state was rebuilt exactly" in replay.stdout


def test_report_draws_the_old_run(old_run: Path) -> None:
    pytest.importorskip("matplotlib")
    drawn = run_twotower("report", "--run", "run", cwd=old_run)
    assert drawn.returncode == 0, drawn.stderr
    assert (old_run / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

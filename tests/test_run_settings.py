"""A run's settings are read as the version that wrote them meant (twotower/run/settings.py).

The golden files under tests/fixtures/old_runs/ are config.json files written by the
TrainConfig of older commits (generated with that commit's own code, `git archive`):
  before-recipe-options    a60e82e^  no residual, lr_schedule, warmup_share, exclude_context,
                                     eval_split, mine_scope, mine_lead
  before-eval-split        737aff3^  no eval_split, mine_scope, mine_lead
  before-mine-scope        c13679e^  no mine_scope, mine_lead
  before-residual-default  94aa777^  every key; residual "none" written out (the old default)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.processes import run_twotower
from twotower.config import TrainConfig
from twotower.data import synthesize
from twotower.run.rundir import read_metrics
from twotower.run.settings import read_run_config, read_settings, write_settings

FIXTURES = Path(__file__).parent / "fixtures" / "old_runs"

# What a run made before each option existed did, from the commits that added them (the
# option's first default, or the behaviour before it): a plain GRU, a constant rate without
# warm-up, no seen-item masking, a random split, every training row mined at the step of use.
MEANT = {
    "residual": "none",
    "lr_schedule": "constant",
    "warmup_share": 0.0,
    "exclude_context": False,
    "eval_split": "random",
    "mine_scope": "all",
    "mine_lead": 0,
}
MISSING = {
    "before-recipe-options": set(MEANT),
    "before-eval-split": {"eval_split", "mine_scope", "mine_lead"},
    "before-mine-scope": {"mine_scope", "mine_lead"},
    "before-residual-default": set(),
}


@pytest.mark.parametrize("version", sorted(MISSING))
def test_an_old_config_reads_as_its_version_meant(version: str, tmp_path: Path) -> None:
    stored = json.loads((FIXTURES / f"{version}.json").read_text())
    assert MISSING[version] == set(MEANT) - set(stored)  # the golden file is what it says
    shutil.copy(FIXTURES / f"{version}.json", tmp_path / "config.json")
    config = read_run_config(tmp_path)
    for name in MEANT:
        expected = stored[name] if name in stored else MEANT[name]
        assert getattr(config, name) == expected, name
    # the negative control: today's defaults mean something else for every missing key
    today = TrainConfig(data="d")
    for name in MISSING[version]:
        assert getattr(today, name) != MEANT[name], name
    assert read_settings(tmp_path)["residual"] == "none"


def test_settings_written_are_read_back_the_same(tmp_path: Path) -> None:
    config = TrainConfig(data="d", out=str(tmp_path), residual="last", steps=7)
    write_settings(tmp_path, config)
    assert read_run_config(tmp_path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left


PLAIN_GRU = (
    "--no-supervise --backend numpy --residual none --steps 24 --batch-size 16 --hidden 12 "
    "--hard-negatives 0 --queue-size 32 --lr 2e-2 --eval-every 8 --checkpoint-every 8 "
    "--max-eval 60 --deterministic"
).split()


def printed_mrr(output: str) -> float:
    """The tower's mrr@100 in `twotower eval`'s table."""
    found = re.search(r"^mrr@100\s+(\S+)", output, re.MULTILINE)
    assert found, output
    return float(found.group(1))


@pytest.mark.slow
def test_eval_of_a_run_from_before_residual_prints_what_it_logged(tmp_path: Path) -> None:
    """The bug of issue 27: eval applied today's default (the residual tower) to a plain GRU."""
    data = tmp_path / "data"
    synthesize(data, samples=400, bank=300, dim=16, seq_len=6, seed=3)
    run = tmp_path / "run"
    trained = run_twotower("train", "--data", str(data), "--out", str(run), *PLAIN_GRU)
    assert trained.returncode == 0, trained.stderr
    settings = json.loads((run / "config.json").read_text())
    del settings["residual"]  # as every run made before the option existed
    (run / "config.json").write_text(json.dumps(settings))
    best = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "best"][-1]
    logged = [
        r["mrr@100"]
        for r in read_metrics(run / "metrics.jsonl")
        if r["event"] == "eval" and r["step"] == best["step"]
    ][0]
    shown = run_twotower("eval", "--run", str(run), "--checkpoint", "best")
    assert shown.returncode == 0, shown.stderr
    assert printed_mrr(shown.stdout) == pytest.approx(logged, abs=5e-5)
    # the negative control: the same weights read as today's default tower score otherwise
    settings["residual"] = "last"
    (run / "config.json").write_text(json.dumps(settings))
    wrong = run_twotower("eval", "--run", str(run), "--checkpoint", "best")
    assert wrong.returncode == 0, wrong.stderr
    assert abs(printed_mrr(wrong.stdout) - logged) > 1e-3

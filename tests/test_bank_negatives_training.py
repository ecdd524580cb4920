"""The trainer's negatives from the whole bank: each step's sampled rows from its own stream,
the logQ table from the training positives, `--bank-negatives auto`'s cost model, the flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.batches import make_batch
from twotower.cli import build_parser, config_from_args
from twotower.config import DEFAULT_SAMPLED, TrainConfig
from twotower.data import synthesize
from twotower.errors import UsageError
from twotower.run.rundir import read_metrics
from twotower.training.negatives import bank_choice
from twotower.training.negatives.bank_negatives import BankNegatives, log_frequencies
from twotower.training.trainer import train


def test_each_step_draws_distinct_rows_from_its_own_stream() -> None:
    bank = np.zeros((500, 4), np.float32)
    negatives = BankNegatives("sampled", 40, bank)
    rows = negatives.draw(seed=7, step=3)
    # written out here: Generator over SeedSequence([seed, step, 3]), 40 of 500, no repeats
    expected = np.random.default_rng(np.random.SeedSequence([7, 3, 3])).choice(500, 40, False)
    np.testing.assert_array_equal(rows, np.sort(expected))
    assert len(set(rows.tolist())) == 40
    assert not np.array_equal(negatives.draw(seed=7, step=4), rows)  # another step, other rows
    np.testing.assert_array_equal(negatives.draw(seed=7, step=3), rows)  # and again the same


def test_the_batch_gets_the_rows_their_vectors_and_logq() -> None:
    batch = make_batch(np.random.default_rng(1), batch=4, dim=6, queue=5)
    bank = np.random.default_rng(2).standard_normal((40, 6)).astype(np.float32)
    log_freq = np.linspace(-5, -1, 40).astype(np.float32)
    batch = BankNegatives("sampled", 9, bank, log_freq).add_to(batch, seed=0, step=5)
    assert batch.bank is bank and not batch.full_softmax
    np.testing.assert_array_equal(batch.sampled_vecs, bank[batch.sampled_ids])
    np.testing.assert_array_equal(batch.in_batch_logq, log_freq[batch.positive_ids])
    queue = batch.queue_ids
    np.testing.assert_array_equal(batch.queue_logq[queue >= 0], log_freq[queue[queue >= 0]])
    full = BankNegatives("full", 0, bank).add_to(batch, seed=0, step=5)
    assert full.full_softmax and full.bank is bank


def test_logq_is_the_log_share_of_training_positives() -> None:
    positives = np.array([3, 3, 1, 3, 0, 1])
    table = log_frequencies(positives, rows=5)
    counts = [1, 2, 1, 3, 1]  # ids 2 and 4 are never positives: they count once
    np.testing.assert_allclose(table, np.log(np.array(counts) / 6), rtol=1e-6)


def config(**settings) -> TrainConfig:
    return TrainConfig(data="d", hidden=768, **settings)


def test_auto_takes_full_for_small_banks_and_sampled_at_the_seeds_scale() -> None:
    small = bank_choice.choose(config(), dim=384, seq_len=5, rows=10_000, backend="torch-cpu")
    assert (small.mode, small.sampled) == ("full", None)
    seed_scale = bank_choice.choose(config(), dim=768, seq_len=5, rows=771_000, backend="numpy")
    assert (seed_scale.mode, seed_scale.sampled) == ("sampled", DEFAULT_SAMPLED)
    assert "771,000 x 768" in seed_scale.reason
    # the share written out: extra candidates (M - B - K - Q) x 2D x 3 over the step's FLOPs
    gru = 5 * 2 * 3 * 768 * (768 + 768) + 2 * 768 * 768
    step = 3 * 32 * (gru + 2 * (32 + 8 + 4096) * 768)
    share = 3 * 32 * 2 * (771_000 - 32 - 8 - 4096) * 768 / step
    assert f"adds {share:.2f} of a step" in seed_scale.reason


def test_an_accelerator_takes_full_where_the_cpu_would_not() -> None:
    shape = dict(dim=768, seq_len=5, rows=100_000)
    assert bank_choice.choose(config(), **shape, backend="torch-cpu").mode == "sampled"
    assert bank_choice.choose(config(), **shape, backend="torch-cuda").mode == "full"


def test_resolve_returns_a_new_config_and_says_what_changed_and_why() -> None:
    c = config(bank_negatives="auto")
    full = bank_choice.resolve(c, dim=384, seq_len=5, rows=10_000, backend="numpy")
    assert full.config.bank_negatives == "full"
    assert (full.config.hard_negatives, full.config.queue_size) == (0, 0)  # bank rows already
    assert (c.bank_negatives, c.hard_negatives, c.queue_size) == ("auto", 8, 4096)  # untouched
    assert full.line is not None and full.line.startswith("--bank-negatives auto: full (")
    assert full.line.endswith(
        ": --hard-negatives 8 -> 0 and --queue-size 4096 -> 0 and --bank-negatives auto -> full, "
        "since every bank row is already a candidate"
    )
    given = bank_choice.resolve(
        config(bank_negatives="full", hard_negatives=3), dim=4, seq_len=2, rows=10, backend="x"
    )
    assert given.line == (
        "bank negatives: full: --hard-negatives 3 -> 0 and --queue-size 4096 -> 0, "
        "since every bank row is already a candidate"
    )
    resumed = config(bank_negatives="auto")
    stored = {"bank_negatives": "sampled", "sampled_negatives": 100}
    kept = bank_choice.resolve(resumed, dim=384, seq_len=5, rows=10_000, backend="x", stored=stored)
    assert (kept.config.bank_negatives, kept.config.sampled_negatives) == ("sampled", 100)
    assert kept.line is not None and "as the run chose at its start" in kept.line
    for mode in ("auto", "none"):  # giving S asks for sampled rows
        given = config(bank_negatives=mode, sampled_negatives=64)
        sampled = bank_choice.resolve(given, dim=384, seq_len=5, rows=10_000, backend="numpy")
        assert (sampled.config.bank_negatives, sampled.config.hard_negatives) == ("sampled", 8)
    defaulted = bank_choice.resolve(config(bank_negatives="sampled"), 4, 2, rows=10, backend="x")
    assert defaulted.config.sampled_negatives == 10  # min(8192, M)
    assert defaulted.line is not None and "--sampled-negatives unset -> 10" in defaulted.line
    plain = bank_choice.resolve(config(), dim=384, seq_len=5, rows=10_000, backend="numpy")
    assert plain.line is None
    assert (plain.config.bank_negatives, plain.config.hard_negatives) == ("none", 8)
    with pytest.raises(UsageError, match="more than the bank's 10 rows"):
        bank_choice.resolve(config(sampled_negatives=11), dim=4, seq_len=2, rows=10, backend="x")


def test_the_flags_are_fields_and_change_the_numeric_hash() -> None:
    args = build_parser().parse_args(
        "train --data d --bank-negatives sampled --sampled-negatives 1000 --logq".split()
    )
    c = config_from_args(args)
    assert (c.bank_negatives, c.sampled_negatives, c.logq) == ("sampled", 1000, True)
    base = TrainConfig(data="d").numeric_hash()
    for change in ({"bank_negatives": "full"}, {"sampled_negatives": 5}, {"logq": True}):
        assert TrainConfig(data="d", **change).numeric_hash() != base, change
    with pytest.raises(UsageError, match="--bank-negatives must be one of"):
        TrainConfig(data="d", bank_negatives="all")
    old = {k: v for k, v in TrainConfig(data="d").to_dict().items() if k != "bank_negatives"}
    differences = TrainConfig(data="d", bank_negatives="full").numeric_differences(old)
    assert "bank_negatives: 'none' -> 'full'" in differences  # a run from before: none
    assert TrainConfig(data="d").bank_negatives == "none"  # the default, from bench/test_quality


def test_auto_is_resolved_logged_and_kept_in_config_json(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data, samples=300, bank=500, dim=16, seq_len=5, seed=4)
    out = tmp_path / "run"
    c = TrainConfig(
        data=str(data),
        out=str(out),
        backend="numpy",
        hidden=8,
        steps=3,
        bank_negatives="auto",
        supervise=False,
    )
    assert train(c).exit_code == 0
    assert (c.bank_negatives, c.hard_negatives) == ("auto", 8)  # the caller's config unchanged
    stored = json.loads((out / "config.json").read_text())
    assert (stored["bank_negatives"], stored["hard_negatives"], stored["queue_size"]) == (
        "full",
        0,
        0,
    )
    log_text = (out / "log.txt").read_text()
    assert "--bank-negatives auto: full (the full softmax over 500 x 16 rows" in log_text
    said = "--hard-negatives 8 -> 0 and --queue-size 4096 -> 0 and --bank-negatives auto -> full"
    assert f"{said}, since every bank row is already a candidate" in log_text
    (start,) = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "start"]
    assert start["bank_negatives"] == "full"

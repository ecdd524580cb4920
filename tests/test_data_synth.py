"""twotower/data/synth.py: synthetic datasets are deterministic, refuse bad sizes, leave
nothing behind when interrupted, say what they wrote, stay in bounded memory, and are
learnable (a GRU finds the positive from the last item; a mean pool does worse).

Recall comes from a brute-force NumPy search, memory from /proc.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import twotower.atomic
import twotower.data.chunks
import twotower.data.dataset
import twotower.data.manifest
import twotower.data.synth
from tests.datasets import (
    assert_gathers,
    expected_gather,
    mapped_from,
    plain_arrays,
)
from tests.processes import run_measured
from twotower import Batch, backends
from twotower.cli import main
from twotower.data import (
    DEMO_SIZES,
    synthesize,
)
from twotower.errors import UsageError
from twotower.training.evaluation.heldout import held_out_split


@pytest.mark.parametrize("layout", ["ids", "contexts"])
def test_synthesize_round_trip(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "synth"
    dataset = synthesize(out, samples=200, bank=90, dim=16, seq_len=7, seed=3, layout=layout)
    plain = plain_arrays(out)
    assert sorted(plain) == sorted(
        ["bank", "lengths", "positives", "context_ids" if layout == "ids" else "contexts"]
    )
    for key, array in plain.items():
        mapped = getattr(dataset, key)
        assert mapped_from(mapped, out / f"{key}.npy"), key
        np.testing.assert_array_equal(mapped, array)
    sizes = (dataset.num_samples, dataset.seq_len, dataset.dim, dataset.bank_size)
    assert sizes == (200, 7, 16, 90)
    assert dataset.layout == layout
    assert_gathers(dataset, plain, [0, 5, 199, 5, 37])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["made_by"]["recipe"]["layout"] == layout
    assert manifest["shapes"]["bank"] == [90, 16]
    assert manifest["format_version"] == 1


def test_synthesize_is_deterministic_and_reuses_its_recipe(tmp_path: Path) -> None:
    sizes = {"samples": 300, "bank": 120, "dim": 8, "seq_len": 5}
    synthesize(tmp_path / "a", seed=1, **sizes)
    synthesize(tmp_path / "b", seed=1, **sizes)
    synthesize(tmp_path / "c", seed=2, **sizes)
    a, b, c = (plain_arrays(tmp_path / name) for name in "abc")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["bank"], c["bank"])

    before = (tmp_path / "a" / "bank.npy").stat()
    synthesize(tmp_path / "a", seed=1, **sizes)
    after = (tmp_path / "a" / "bank.npy").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(UsageError, match="already holds a dataset"):
        synthesize(tmp_path / "a", seed=2, **sizes)
    synthesize(tmp_path / "a", seed=2, overwrite=True, **sizes)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "bank.npy"), c["bank"])


def test_synthesize_refuses_bad_sizes(tmp_path: Path) -> None:
    bad_sizes = (
        {"bank": 1},
        {"samples": 0},
        {"dim": 2.5},
        {"seed": -1},
        {"layout": "dense"},
        {"follow": 1.5},
    )
    for bad in bad_sizes:
        with pytest.raises(UsageError):
            synthesize(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_an_interrupted_synthesize_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(twotower.data.synth, "_walks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "x", samples=10, bank=10, dim=4)
    assert list((tmp_path / "x").iterdir()) == []


def test_synthetic_positive_follows_the_last_item_not_the_mean(tmp_path: Path) -> None:
    """The structure promised: a linear map of the last context vector finds the positive;
    the same fit from the mean of the sequence does far worse. Variable lengths, -1 padding."""
    dataset = synthesize(tmp_path / "s", samples=3000, bank=1500, dim=32, seq_len=8)
    plain = plain_arrays(tmp_path / "s")
    bank, ids, lengths, positives = (
        plain[k] for k in ("bank", "context_ids", "lengths", "positives")
    )
    assert set(np.unique(lengths)) == set(range(1, 9))
    np.testing.assert_array_equal(ids == -1, np.arange(8)[None, :] >= lengths[:, None])
    contexts, _, _ = expected_gather(plain, np.arange(dataset.num_samples))
    last = contexts[np.arange(len(lengths)), lengths - 1]
    mean = contexts.sum(axis=1) / lengths[:, None]
    fit, held = slice(0, 2000), slice(2000, None)

    def linear_recall(features: np.ndarray) -> float:
        weights, *_ = np.linalg.lstsq(features[fit], bank[positives[fit]], rcond=None)
        scores = features[held] @ weights @ bank.T
        top10 = np.argpartition(-scores, 10, axis=1)[:, :10]
        return float(np.mean(np.any(top10 == positives[held, None], axis=1)))

    from_last, from_mean = linear_recall(last), linear_recall(mean)
    assert from_last > 0.9, from_last
    assert from_mean < from_last - 0.4, (from_last, from_mean)


@pytest.mark.slow
def test_synthesize_writes_a_big_bank_in_bounded_memory(tmp_path: Path) -> None:
    report = run_measured(
        """
        dataset = synthesize(sys.argv[1], samples=20_000, bank=200_000, dim=384, seq_len=10)
        report = {"bytes": dataset.bank.nbytes}
        """,
        tmp_path / "big",
        tmp_path,
    )
    assert report["bytes"] == 200_000 * 384 * 4
    assert report["growth"] < report["bytes"] / 4, (
        f"RssAnon grew by {report['growth'] / 1e6:.0f} MB"
    )


def test_synth_says_what_it_wrote_in_one_sentence(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    flags = "--samples 300 --bank 100 --dim 8 --seq-len 5".split()
    assert main(["synth", "--out", str(out), *flags]) == 0
    size = sum(file.stat().st_size for file in out.iterdir())
    assert capsys.readouterr().out == (
        f"{out} holds a synthetic dataset: 300 samples of up to 5 context items (layout ids: "
        f"bank rows), a bank of 100 x 8 vectors, {size / 1024:,.0f} KiB on disk\n"
    )


def test_demo_sizes_are_the_defaults(tmp_path: Path) -> None:
    recipe = synthesize(tmp_path / "demo").manifest["made_by"]["recipe"]
    assert {key: recipe[key] for key in DEMO_SIZES} == DEMO_SIZES


@pytest.fixture
def one_torch_thread():
    """Tiny GEMMs: a second intra-op thread only adds contention on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_data_is_learnable_by_a_gru_more_than_by_a_mean_pool(
    tmp_path: Path, one_torch_thread
) -> None:
    dataset = synthesize(tmp_path / "s", samples=4000, bank=2000, dim=32, seq_len=10)
    train, held = held_out_split(dataset.num_samples, 0.125, 500, seed=0)
    bank = np.asarray(dataset.bank)
    eval_contexts, eval_lengths, eval_positives = dataset.gather(held)

    def recall_at_10(backend) -> float:
        scores = backend.encode(eval_contexts, eval_lengths) @ bank.T
        top10 = np.argpartition(-scores, 10, axis=1)[:, :10]
        return float(np.mean(np.any(top10 == eval_positives[:, None], axis=1)))

    recall = {}
    for tower in ("gru", "meanpool"):
        backend = backends.get("torch-cpu", tower=tower, dim=32, hidden=32, lr=3e-3, seed=0)
        before = recall_at_10(backend)
        rng = np.random.default_rng(0)
        for _ in range(300):
            contexts, lengths, positives = dataset.gather(
                np.sort(rng.choice(train, 32, replace=False))
            )
            backend.step(Batch.in_batch_only(contexts, lengths, positives, bank[positives]))
        recall[tower] = (before, recall_at_10(backend))
    chance = 10 / dataset.bank_size
    assert recall["gru"][0] < 5 * chance, recall
    assert recall["gru"][1] > 0.6, recall  # > 100 x chance
    assert recall["meanpool"][1] < recall["gru"][1] - 0.3, recall

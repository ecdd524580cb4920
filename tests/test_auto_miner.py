"""`--miner auto`: exact while a refresh is cheap, faiss IVF with about 4 sqrt(M) lists beyond
(nprobe tuned to a recall target), hnswlib or exact without faiss; the choice is logged and kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import twotower
from tests.neighbours import recall
from tests.runs import tiny_config
from twotower import miners
from twotower.data import synthesize
from twotower.miners import auto
from twotower.miners.auto import choose_miner
from twotower.run.rundir import read_metrics


def test_small_refreshes_stay_exact() -> None:
    choice = choose_miner(rows=3000, dim=16, queries=300, available=["exact", "faiss"])
    assert (choice.miner, choice.settings) == ("exact", {})
    assert "an exact refresh of 300 queries over 3,000 x 16 rows" in choice.reason


@pytest.mark.parametrize(("rows", "lists"), [(100_000, 1024), (200_000, 2048), (771_000, 4096)])
def test_large_refreshes_take_faiss_ivf_with_about_4_sqrt_m_lists(rows: int, lists: int) -> None:
    choice = choose_miner(rows=rows, dim=768, queries=99_000, available=["exact", "faiss"])
    assert choice.miner == "faiss"
    assert choice.settings == {
        "faiss_index": f"IVF{lists},Flat",
        "faiss_target_recall": auto.TARGET_RECALL,
    }
    assert 0.5 <= lists / (4 * math.sqrt(rows)) <= 2  # "about 4 sqrt(M)", a power of two


def test_without_faiss_hnswlib_then_exact() -> None:
    big = {"rows": 771_000, "dim": 768, "queries": 99_000}
    assert choose_miner(**big, available=["exact", "hnswlib"]).miner == "hnswlib"
    fallback = choose_miner(**big, available=["exact"])
    assert fallback.miner == "exact" and "neither faiss nor hnswlib" in fallback.reason


@pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")
def test_auto_is_resolved_logged_and_kept_in_config_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the exact budget at 0 s, even a small bank takes faiss IVF: nprobe is tuned after
    the build, and config.json records the choice so a resume keeps it."""
    monkeypatch.setattr(auto, "EXACT_REFRESH_SECONDS", 0.0)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    synthesize(data, samples=300, bank=3000, dim=16, seq_len=5, seed=4)
    result = twotower.train(tiny_config(data, tmp_path / "run", miner="auto"))
    assert (result.exit_code, result.miner) == (0, "faiss")
    stored = json.loads((result.run_dir / "config.json").read_text())
    assert (stored["miner"], stored["faiss_index"]) == ("faiss", "IVF64,Flat")
    (start,) = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["event"] == "start"]
    build = start["miner_build"]
    assert build["tuned_recall"] >= auto.TARGET_RECALL or build["nprobe"] == 64
    assert build["params"] == {"nlist": 64, "nprobe": build["nprobe"]}
    log = (result.run_dir / "log.txt").read_text()
    assert "--miner auto chose faiss (--faiss-index IVF64,Flat" in log


@pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")
def test_the_tuned_nprobe_reaches_the_target_on_queries_it_never_saw() -> None:
    """Recall@32 of the tuned index on fresh queries from the bank's distribution (unclustered,
    where IVF needs many lists), computed here against brute force; nprobe 1 is the negative
    control."""

    points = np.random.default_rng(5).standard_normal((20_300, 32)).astype(np.float32)
    bank, queries = points[:20_000], points[20_000:]
    truth = np.argsort(-(queries @ bank.T), axis=1)[:, :32]
    tuned = miners.get("faiss", isolation="none", index="IVF512,Flat", target_recall=0.9)
    tuned.build(bank)
    assert recall(tuned.search(queries, 32)[1], truth) >= 0.85  # 0.9 on the tuning rows
    weak = miners.get("faiss", isolation="none", index="IVF512,Flat", nprobe=1)
    weak.build(bank)
    assert recall(weak.search(queries, 32)[1], truth) < 0.85

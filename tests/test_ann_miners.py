"""The faiss and hnswlib miners against brute force: Flat equal up to ties, HNSW / IVF /
hnswlib recall@64 >= 0.95 on clustered data, scores that are dot products, padding, the
index cache (built once, loaded after, rebuilt for another bank) and option errors.

These run the engines in this process (isolation="none"); test_miner_isolation.py runs
them in workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.neighbours import assert_same_neighbours, brute_force, recall
from twotower import miners
from twotower.errors import EngineUnavailable, UsageError

K = 64
pytestmark = pytest.mark.skipif(
    not {"faiss", "hnswlib"} <= set(miners.available()), reason="needs faiss and hnswlib"
)


def clustered(rows: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors (rows, dim) float32 around `clusters` random centres: what ANN is for."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(clusters, size=rows)] + 0.4 * rng.standard_normal((rows, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bank (10000, 64), queries (300, 64), brute-force ids (300, K)) from 50 clusters."""
    points = clustered(10_300, 64, 50, seed=1)
    bank, queries = points[:10_000], points[10_000:]
    return bank, queries, brute_force(bank, queries, K)[1]


def test_faiss_flat_equals_brute_force_up_to_ties() -> None:
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((3000, 32)).astype(np.float32)
    bank[1500:2000] = bank[:500]  # duplicate rows: real ties the comparison must accept
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    miner = miners.get("faiss", isolation="none")
    miner.build(bank)
    scores, ids = miner.search(queries, 20)
    ref_scores, ref_ids = brute_force(bank, queries, 20)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert_same_neighbours(scores, ids, ref_scores, ref_ids, atol=1e-4)  # float32 GEMM rounding
    with pytest.raises(AssertionError):  # negative control: ids shifted by one row
        assert_same_neighbours(scores, ids + 1, ref_scores, ref_ids, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("faiss", {"index": "HNSW16"}),
        ("faiss", {"index": "IVF50,Flat", "nprobe": 4}),
        ("hnswlib", {"M": 8, "ef_construction": 100, "ef": 100}),
    ],
    ids=["faiss-HNSW16", "faiss-IVF50", "hnswlib"],
)
def test_ann_recall_and_dot_product_scores(name: str, opts: dict, clustered_case) -> None:
    bank, queries, ref_ids = clustered_case
    miner = miners.get(name, isolation="none", **opts)
    miner.build(bank)
    scores, ids = miner.search(queries, K)
    assert recall(ids, ref_ids) >= 0.95
    dots = np.einsum("nd,nkd->nk", queries.astype(np.float64), bank[ids].astype(np.float64))
    np.testing.assert_allclose(scores, dots, atol=1e-5)  # hnswlib's 1 - dot costs float32 ulps
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_recall_threshold_can_fail(clustered_case) -> None:
    """Negative control: IVF visiting 1 list of 200 misses neighbours in the others."""
    bank, queries, ref_ids = clustered_case
    miner = miners.get("faiss", isolation="none", index="IVF200,Flat", nprobe=1)
    miner.build(bank)
    assert recall(miner.search(queries, K)[1], ref_ids) < 0.95


@pytest.mark.parametrize("name", ["faiss", "hnswlib"])
def test_fewer_rows_than_k_pads_with_minus_one(name: str) -> None:
    bank = clustered(10, 8, 2, seed=3)
    miner = miners.get(name, isolation="none")
    miner.build(bank)
    scores, ids = miner.search(bank[:4], 16)
    assert (ids[:, 10:] == -1).all() and np.isneginf(scores[:, 10:]).all()
    assert sorted(ids[0, :10]) == list(range(10))


@pytest.mark.parametrize(
    ("name", "opts", "search_opts"),
    [
        ("faiss", {"index": "HNSW16"}, {"ef_search": 40}),
        ("faiss", {"index": "IVF16,Flat"}, {"nprobe": 4}),
        ("hnswlib", {"M": 8}, {"ef": 40}),
    ],
    ids=["faiss-HNSW16", "faiss-IVF16", "hnswlib"],
)
def test_index_cache_loads_the_second_time_and_rebuilds_for_another_bank(
    name: str, opts: dict, search_opts: dict, tmp_path: Path
) -> None:
    bank = clustered(2000, 16, 10, seed=4)

    def built(bank: np.ndarray, **more: object) -> tuple[str, np.ndarray]:
        miner = miners.get(name, isolation="none", cache_dir=tmp_path, **opts, **more)
        miner.build(bank)
        return miner.build_info["source"], miner.search(bank[:20], 10)[1]

    first_source, first_ids = built(bank, target_recall=None)  # the fixed defaults: exhaustive
    second_source, second_ids = built(bank, **search_opts)  # search-time options share the entry
    assert (first_source, second_source) == ("built", "loaded")
    changed = bank.copy()
    changed[7] = changed[8]
    assert built(changed)[0] == "built"
    assert built(bank)[0] == "loaded"  # the first bank's entry is still there
    assert built(bank, seed=5)[0] == "built"  # a build parameter is part of the key
    if not search_opts.get("ef_search") and not search_opts.get("ef"):
        assert (first_ids == second_ids).all()


def test_faiss_maps_its_cached_index_instead_of_reading_it(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    bank = clustered(3000, 16, 10, seed=6)
    miner = miners.get("faiss", isolation="none", cache_dir=tmp_path, index="HNSW16")
    miner.build(bank)
    assert miner.build_info["path"] in Path("/proc/self/maps").read_text()


def test_faiss_flat_builds_nothing(tmp_path: Path) -> None:
    miner = miners.get("faiss", isolation="none", cache_dir=tmp_path)
    miner.build(clustered(100, 8, 2, seed=7))
    assert miner.build_info["source"] == "direct"
    assert not list(tmp_path.iterdir())


UNPARSABLE = r"NotAnIndex: faiss cannot make this index \(could not parse"


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="has no option bogus"):
        miners.get("faiss", bogus=1)
    with pytest.raises(UsageError, match="isolation 'thread'"):
        miners.get("faiss", isolation="thread")
    with pytest.raises(EngineUnavailable, match="unknown miner"):
        miners.get("annoy")
    bank = clustered(300, 8, 2, seed=8)
    with pytest.raises(UsageError, match=UNPARSABLE):
        miners.get("faiss", isolation="none", index="NotAnIndex").build(bank)
    with pytest.raises(UsageError, match="has no nprobe parameter"):
        miners.get("faiss", isolation="none", index="HNSW8", nprobe=4).build(bank)
    with pytest.raises(UsageError, match="has no efConstruction parameter"):
        miners.get("faiss", isolation="none", index="IVF4,Flat", ef_construction=80).build(bank)
    with pytest.raises(UsageError, match=UNPARSABLE):  # through a worker
        miners.get("faiss", isolation="process", index="NotAnIndex").build(bank)


def test_chain_routes_each_option_to_the_engines_that_take_it() -> None:
    chain = miners.chain("faiss,hnswlib", isolation="none", index="HNSW8", ef=32)
    bank = clustered(300, 8, 2, seed=9)
    chain.build(bank)
    assert isinstance(chain, miners.Miner) and chain.name == "faiss"
    assert chain.search(bank[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(UsageError, match="no miner of faiss, exact has option ef"):
        miners.chain("faiss,exact", ef=32)
    with pytest.raises(EngineUnavailable):
        miners.chain("faiss,annoy")

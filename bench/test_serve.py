"""What `twotower encode` costs over the loop you would write by hand: the same gather +
engine.encode per chunk into an in-memory array, against encode_to_file's memory-mapped,
fsynced, renamed .npy (target: within a few percent); and the exported tower's engines
(torch module, NumPy encoder, ONNX) against the training engine's encode on one batch.

    pytest bench/test_serve.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.report import RatioReport
from twotower import backends, load_tower
from twotower.data import Dataset, synthesize
from twotower.serve.encode import chunk_rows, encode_to_file
from twotower.serve.tower_dir import write_tower_files
from twotower.towers import TowerSpec, init_params

N, T, D, H = 8000, 10, 128, 128
BACKEND = "torch-cpu" if "torch-cpu" in backends.available() else "numpy"
REPORT_TITLE = f"encode: {BACKEND}, GRU D={D} H={H} T={T}, {N} rows"
SPEC = TowerSpec("gru", dim=D, hidden=H, layers=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return synthesize(tmp_path_factory.mktemp("data") / "d", samples=N, bank=2000, dim=D, seq_len=T)


@pytest.fixture(scope="module")
def engine() -> backends.Backend:
    return backends.get(BACKEND, tower="gru", dim=D, hidden=H, seed=1)


def by_hand(engine: backends.Backend, dataset: Dataset) -> np.ndarray:
    rows = np.arange(dataset.num_samples)
    size = chunk_rows(dataset)
    out = np.empty((len(rows), D), np.float32)
    for start in range(0, len(rows), size):
        contexts, lengths, _ = dataset.gather(rows[start : start + size])
        out[start : start + size] = engine.encode(contexts, lengths)
    return out


def test_by_hand(benchmark, report: RatioReport, engine, dataset) -> None:
    benchmark.pedantic(by_hand, args=(engine, dataset), rounds=3, warmup_rounds=1)
    report.add("in-memory loop (by hand)", benchmark)


def test_encode_to_file(benchmark, report: RatioReport, engine, dataset, tmp_path: Path) -> None:
    rows = np.arange(dataset.num_samples)
    benchmark.pedantic(
        encode_to_file, args=(engine, dataset, rows, tmp_path / "q.npy"), rounds=3, warmup_rounds=1
    )
    report.add("encode_to_file (.npy, renamed)", benchmark, baseline="in-memory loop (by hand)")
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), by_hand(engine, dataset), atol=1e-6)


@pytest.fixture(scope="module")
def batch(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    contexts, lengths, _ = dataset.gather(np.arange(1024))
    return contexts, lengths


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tower")
    write_tower_files(directory, SPEC, init_params(SPEC, 1))
    return directory


@pytest.mark.parametrize("name", ["training engine", "numpy", "torch"])
def test_one_batch(benchmark, report: RatioReport, batch, exported: Path, name: str) -> None:
    """1024 rows through the training engine's encode, and through each exported engine."""
    if name == "torch" and BACKEND == "numpy":
        pytest.skip("needs torch")
    if name == "training engine":
        encode = backends.get(BACKEND, tower="gru", dim=D, hidden=H, seed=1).encode
    else:
        encode = load_tower(exported, engine=name).encode
    benchmark.pedantic(encode, args=batch, rounds=5, warmup_rounds=1)
    baseline = None if name == "training engine" else f"{BACKEND} encode, 1024 rows"
    report.add(
        f"{BACKEND} encode, 1024 rows" if baseline is None else f"exported {name}",
        benchmark,
        baseline=baseline,
    )

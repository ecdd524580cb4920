"""twotower/data/npy.py: the members of a stored .npz are mapped in place, at their own
offsets, and never enter memory (RssAnon measured in a fresh child)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.datasets import (
    mapped_from,
    small_arrays,
    write_npz,
)
from tests.processes import run_measured
from twotower.data import (
    load_dataset,
    npz_cache_dirs,
)


def test_stored_npz_is_mapped_in_place(tmp_path: Path) -> None:
    arrays = small_arrays()
    npz = write_npz(tmp_path / "data.npz", arrays, compressed=False)
    dataset = load_dataset(npz)
    offsets = set()
    for key in arrays:
        array = getattr(dataset, key)
        assert mapped_from(array, npz), key
        offsets.add(array.offset)
    assert len(offsets) == len(arrays) and min(offsets) > 0  # each at its own member
    assert not list(npz_cache_dirs(npz)[0].glob("*.npy"))  # nothing unpacked


@pytest.mark.slow
def test_stored_npz_does_not_enter_memory(tmp_path: Path) -> None:
    rows, dim, samples = 100_000, 768, 20_000  # a 307 MB bank
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", "w+", np.float32, (rows, dim))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 10_000):
        bank[start : start + 10_000] = rng.standard_normal((10_000, dim), dtype=np.float32)
    ids = rng.integers(0, rows, size=(samples, 10))
    npz = tmp_path / "big.npz"
    np.savez(npz, bank=bank, context_ids=ids, lengths=np.full(samples, 10), positives=ids[:, 0])
    del bank
    report = run_measured(
        """
        dataset = load_dataset(sys.argv[1])
        for rows in np.array_split(np.arange(dataset.num_samples), dataset.num_samples // 256):
            contexts, lengths, positives = dataset.gather(rows)
            dataset.bank[positives].sum()
        report = {"mapped": isinstance(dataset.bank, np.memmap)}
        """,
        npz,
        tmp_path,
    )
    size = npz.stat().st_size
    assert size > 300e6
    assert report["mapped"]
    # reading the bank whole would add >= 307 MB; what is allowed is chunks, batches and the
    # allocator keeping some of them (about 16 MB seen)
    assert report["growth"] < size / 4, f"RssAnon grew by {report['growth'] / 1e6:.0f} MB"

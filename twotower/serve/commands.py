"""The work behind `twotower encode` and `twotower search`, called by the CLI with plain values."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from twotower import miners, progress
from twotower.data import Dataset, load_dataset
from twotower.errors import UsageError
from twotower.paths import user_cache_dir
from twotower.process import faults
from twotower.serve.encode import encode_to_file, open_tower, select_rows, tower_backend
from twotower.serve.export import say_checkpoint
from twotower.serve.search import search_to_file
from twotower.serve.tower_dir import TowerFiles


def _say_wrote(path: Path, what: str) -> None:
    print(f"twotower: wrote {path} ({what})", file=sys.stderr, flush=True)


def _open(
    model: str | None, run: str | None, checkpoint: str | None, data: str | None, rows: str
) -> tuple[TowerFiles, Dataset, np.ndarray]:
    """The tower (a run's checkpoint named in one line), its dataset and the rows selected
    (see `encode_command`)."""
    files = open_tower(model, run, checkpoint)
    if run is not None:
        say_checkpoint(files)
    dataset = _dataset(files, data)
    return files, dataset, select_rows(dataset, rows, files.split)


def _dataset(files: TowerFiles, data: str | None) -> Dataset:
    """--data, or the dataset the tower was trained on; UsageError if neither names one."""
    data = data or files.doc.get("data")
    if data is None:
        raise UsageError("--data DIR is needed (the dataset whose rows to encode)")
    dataset = load_dataset(data)
    if dataset.dim != files.spec.dim:
        raise UsageError(
            f"{data}: vectors of size {dataset.dim}, but the tower takes {files.spec.dim}"
        )
    return dataset


def encode_command(
    out: str,
    data: str | None = None,
    model: str | None = None,
    run: str | None = None,
    checkpoint: str | None = None,
    rows: str = "all",
    backend: str = "auto",
) -> Path:
    """Encode a dataset's rows with an exported tower or a run's; returns the .npy written."""
    files, dataset, selected = _open(model, run, checkpoint, data, rows)
    faults.arm(None)
    with progress.lines_on_stderr():
        written = encode_to_file(tower_backend(files, backend), dataset, selected, out)
    _say_wrote(written, f"{len(selected):,} x {dataset.dim} float32")
    return written


def search_command(
    out: str,
    k: int = 100,
    data: str | None = None,
    model: str | None = None,
    run: str | None = None,
    checkpoint: str | None = None,
    rows: str = "all",
    miner: str = "exact",
    exclude_context: bool = False,
    backend: str = "auto",
    faiss_index: str = "Flat",
) -> Path:
    """Top-k bank rows for a dataset's rows, through `miner` (isolated like in training,
    its index cached by the bank's fingerprint); returns the .npz written."""
    files, dataset, selected = _open(model, run, checkpoint, data, rows)
    options: dict[str, Any] = {"index": faiss_index} if miner == "faiss" else {}
    faults.arm(None)  # TWOTOWER_INJECT_FAULT=segv@mine:0:faiss crashes the worker's search
    search = miners.get(miner, cache_dir=user_cache_dir() / "index", **options)
    try:
        with progress.lines_on_stderr():
            search.build(dataset.bank, fingerprint=dataset.fingerprint)
            written = search_to_file(
                tower_backend(files, backend), search, dataset, selected, k, out, exclude_context
            )
    finally:
        close = getattr(search, "close", None)
        if close is not None:
            close()
    _say_wrote(written, f"ids and scores, {len(selected):,} x {k}; rows, {len(selected):,}")
    return written

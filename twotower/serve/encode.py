"""`twotower encode`: a dataset's rows -> query vectors in a .npy, chunk by chunk.

The output is a memory map under a temporary name beside the target, flushed
and fsynced, then renamed over it: a crash (even SIGKILL) mid-write leaves the
old file or none, never a torn one. Neither the dataset nor the result is held
in memory whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from twotower import backends, progress
from twotower.atomic import replacing
from twotower.backends import Backend
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.data.chunks import CHUNK_BYTES
from twotower.errors import UsageError
from twotower.process import faults
from twotower.process.phase import Phase
from twotower.serve.export import tower_from_run
from twotower.serve.tower_dir import TowerFiles, read_tower_files
from twotower.training.evaluation.heldout import held_out

ROW_SETS = ("all", "train", "held-out")


def open_tower(
    model: str | None = None, run: str | None = None, checkpoint: str | None = None
) -> TowerFiles:
    """The tower of an exported directory (`model`) or of a run's checkpoint (`run`;
    `checkpoint` as `tower_from_run` takes it)."""
    if (model is None) == (run is None):
        raise UsageError("give exactly one of --model DIR (an export) or --run RUN")
    if model is not None:
        return read_tower_files(model)
    assert run is not None
    return tower_from_run(run, checkpoint)


def tower_backend(files: TowerFiles, name: str = "auto") -> Backend:
    """A backend (`--backend`, 'auto': torch-cpu where installed, else numpy) holding the
    tower's parameters."""
    spec = files.spec
    engine = backends.get(
        backends.resolve(name),
        tower=spec.kind,
        dim=spec.dim,
        hidden=spec.hidden,
        layers=spec.layers,
        proj=spec.proj,
        residual=spec.residual,
    )
    engine.load_state(files.params)
    return engine


def select_rows(dataset: Dataset, which: str, split: dict[str, Any] | None) -> np.ndarray:
    """Dataset rows (int64, ascending) of `which`: all, train or held-out (the run's split)."""
    if which not in ROW_SETS:
        raise UsageError(f"--rows {which!r}: choose one of {', '.join(ROW_SETS)}")
    if which == "all":
        return np.arange(dataset.num_samples, dtype=np.int64)
    if not split or any(split.get(key) is None for key in ("eval_fraction", "max_eval", "seed")):
        raise UsageError(f"--rows {which} needs the run's split settings; use --run or --rows all")
    config = TrainConfig(
        data=str(dataset.path),
        out=".",
        eval_fraction=float(split["eval_fraction"]),
        max_eval=int(split["max_eval"]),
        seed=int(split["seed"]),
        eval_split=str(split.get("eval_split") or "random"),  # exports before groups: random
        eval_data=split.get("eval_data"),
    )
    rows = held_out(config, dataset)
    if which == "held-out" and rows.kind == "eval-data":
        raise UsageError(
            f"the run held out a separate validation set ({config.eval_data}); "
            f"encode it with --data {config.eval_data} --rows all"
        )
    return rows.train_rows if which == "train" else rows.eval_rows


def chunk_rows(dataset: Dataset) -> int:
    """Rows per chunk: about CHUNK_BYTES of gathered context vectors."""
    return max(1, CHUNK_BYTES // max(1, dataset.seq_len * dataset.dim * 4))


def chunks(rows: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, rows[offset : offset + size]) covering `rows`."""
    for start in range(0, len(rows), size):
        yield start, rows[start : start + size]


def encode_to_file(
    encoder: Backend,
    dataset: Dataset,
    rows: np.ndarray,
    out: str | os.PathLike[str],
    chunk: int | None = None,
) -> Path:
    """Encode dataset `rows` with `encoder` into `out` (.npy, (len(rows), D) float32, row i
    holding rows[i]'s query vector), `chunk` rows at a time; returns `out`."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name the .npy file to write")
    if len(rows) == 0:
        raise UsageError("no rows to encode (--rows selects none)")
    size = chunk or chunk_rows(dataset)
    what = f"{len(rows):,} rows with {encoder.name}"
    with (
        replacing(out, durable=True) as tmp,
        progress.task(Phase.ENCODE, what, len(rows), "rows", announce=True) as task,
    ):
        result = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(len(rows), dataset.dim)
        )
        for done, (start, part) in enumerate(chunks(rows, size)):
            faults.set_step(done)  # TWOTOWER_INJECT_FAULT=kill@encode:N dies after N chunks
            faults.point(Phase.ENCODE, [encoder.name])
            contexts, lengths, _ = dataset.gather(part)
            result[start : start + len(part)] = encoder.encode(contexts, lengths)
            task.advance(len(part))
        result.flush()
    return out

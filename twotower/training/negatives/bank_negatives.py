"""What a step takes from the whole frozen bank: the bank itself (full softmax), S rows drawn
for the step (sampled), and the logQ table (DESIGN.md, "Negatives from the whole bank").

Step s's S rows are drawn, uniformly and without replacement, from its own stream
SeedSequence([seed, s, SAMPLED]) (`seeds.py`), so a resumed run draws the same rows. The logQ
table, log(freq_j / N) of every bank row j from the N training positives (an id that is never
a positive counts once: only empty slots, which are masked, can have one), is kept with the
run (RUN/logq.npy) and read back on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from twotower.atomic import replace_file
from twotower.batch import Batch
from twotower.seeds import SAMPLED, step_rng

LOGQ_FILE = "logq.npy"


@dataclass(frozen=True)
class BankNegatives:
    """mode: full | sampled | none (TrainConfig.bank_negatives, resolved); sampled: S;
    bank (M, D) float32, memory-mapped; log_freq (M,) float32 or None without logQ."""

    mode: str
    sampled: int
    bank: np.ndarray
    log_freq: np.ndarray | None = None

    def draw(self, seed: int, step: int) -> np.ndarray:
        """(S,) int64 sorted distinct bank rows of step `step` (steps count from 0)."""
        rows = step_rng(seed, step, SAMPLED).choice(len(self.bank), self.sampled, replace=False)
        return np.sort(rows).astype(np.int64)  # sorted: the memory map is read in order

    def add_to(self, batch: Batch, seed: int, step: int) -> Batch:
        """`batch` with this step's bank candidates and logQ corrections."""
        extra: dict = {}
        if self.mode != "none":
            extra.update(bank=self.bank, full_softmax=self.mode == "full")
        if self.mode == "sampled":
            ids = self.draw(seed, step)
            extra.update(sampled_ids=ids, sampled_vecs=np.asarray(self.bank[ids], np.float32))
        if self.log_freq is not None:
            extra.update(
                in_batch_logq=self.log_freq[batch.positive_ids],
                queue_logq=self.log_freq[np.maximum(batch.queue_ids, 0)],
            )
        return replace(batch, **extra) if extra else batch


def log_frequencies(positives: np.ndarray, rows: int) -> np.ndarray:
    """(rows,) float32 log(freq_j / N) of ids among the N training `positives` (N,)."""
    counts = np.bincount(np.asarray(positives, dtype=np.int64), minlength=rows)
    return np.log(np.maximum(counts, 1) / len(positives)).astype(np.float32)


def logq_table(run_root: Path, positives: np.ndarray, rows: int, write: bool) -> np.ndarray:
    """The run's logQ table: RUN/logq.npy when the run has one (a resume), else computed from
    the training `positives` and, when `write` (the process that writes run files), saved."""
    path = run_root / LOGQ_FILE
    if path.is_file():
        return np.load(path)
    table = log_frequencies(positives, rows)
    if write:
        replace_file(path, lambda file: np.save(file, table), durable=True)
    return table

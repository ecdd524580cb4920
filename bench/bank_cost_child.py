"""One process of bench/test_bank_cost.py: torch-cpu steps of the seed's shape (GRU H=768,
B=32, Q=4096) with negatives from the bank (`none`, `sampled`, `full`), timed per step, and
this process's memory at the end (VmHWM, RssAnon, RssFile).

    python -m bench.bank_cost_child DATA MODE STEPS  ->  one JSON line on stdout
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from twotower import backends
from twotower.data import load_dataset
from twotower.process.memory import linux_reading
from twotower.training.batching import StepPlan, assemble_batch, gather_step
from twotower.training.negatives.bank_negatives import BankNegatives
from twotower.training.negatives.mining import HardNegativeTable
from twotower.training.negatives.queue import MemoryQueue

B, H, Q, S = 32, 768, 4096, 8192


def main(data: str, mode: str, steps: int) -> dict:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread, as the quality runs
    dataset = load_dataset(data)
    backend = backends.get("torch-cpu", dim=dataset.dim, hidden=H)
    plan = StepPlan(np.arange(dataset.num_samples), B, seed=0)
    queue = MemoryQueue(Q, dataset.dim)
    rng = np.random.default_rng(0)
    ids = rng.choice(dataset.bank_size, Q, replace=False)
    queue.push(ids, np.asarray(dataset.bank[np.sort(ids)], dtype=np.float32))
    table = HardNegativeTable.empty(dataset.num_samples, 1)
    from_bank = BankNegatives(mode, S, dataset.bank)
    seconds = []
    for step in range(steps):
        started = time.perf_counter()  # a step: gather, its bank rows, forward, backward, AdamW
        data_step = gather_step(dataset, step, plan.rows_for(step), exclude_context=True)
        batch = assemble_batch(data_step, table, queue, dataset.bank, 0, 0, 0, from_bank)
        stats = backend.step(batch)
        seconds.append(time.perf_counter() - started)
        assert stats.applied
    memory = linux_reading()
    return {"mode": mode, "seconds": seconds, **{k: memory.get(k) for k in memory}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))

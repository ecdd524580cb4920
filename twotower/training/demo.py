"""`twotower train --demo`: built-in synthetic data and settings that train in half a minute."""

from __future__ import annotations

from typing import Any

from twotower.data import DEMO_SIZES, Dataset, synthesize
from twotower.paths import user_cache_dir

# Applied under --demo; a --config file or flags override them.
DEMO_SETTINGS: dict[str, Any] = {
    "hidden": 128,
    "steps": 1200,
    "eval_every": 300,
    "mine_every": 400,
    "checkpoint_every": 300,
    "queue_size": 1024,
    "lr": 3e-3,
}


def demo_dataset() -> Dataset:
    """The demo dataset, synthesized into the user cache directory on first use."""
    sizes = DEMO_SIZES
    name = f"demo-{sizes['samples']}x{sizes['seq_len']}-bank{sizes['bank']}x{sizes['dim']}"
    return synthesize(
        user_cache_dir() / name,
        samples=sizes["samples"],
        bank=sizes["bank"],
        dim=sizes["dim"],
        seq_len=sizes["seq_len"],
        overwrite=True,
    )

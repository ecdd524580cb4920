"""Where twotower keeps what it can rebuild: demo data, unpacked .npz files, miner indexes."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """$TWOTOWER_CACHE, else $XDG_CACHE_HOME/twotower, else ~/.cache/twotower."""
    explicit = os.environ.get("TWOTOWER_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twotower"

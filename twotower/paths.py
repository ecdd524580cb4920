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


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path as a line for the user shows it: relative to the current directory where it lies
    below it, else with ~ for the home directory, else absolute."""
    path = Path(path).absolute()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        if path.is_relative_to(base) and path != base:
            return prefix + str(path.relative_to(base))
    return str(path)

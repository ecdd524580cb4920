"""Built miner indexes on disk, keyed by what they were built from, and the chunked build.

An index is stored once per (bank fingerprint, miner, build parameters, library
version) under a cache directory, written to a temporary name and renamed, so
a crash mid-write never leaves a half index under the real name. A changed bank
has another fingerprint and so another entry. Search-time parameters (nprobe,
efSearch, ef) are not part of the key: they do not change what is stored.

Whether an index was built or loaded is returned as a `BuildInfo` and logged
on the "twotower.miners" logger, so tests and reports can tell without timing.
Loading and building are `twotower.progress` tasks ("load-index", "build-index",
with "add-to-index" and "save-index" inside), so a trainer shows them as
phases with progress, even from a worker process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from twotower import progress
from twotower.atomic import replacing
from twotower.process.phase import Phase

CACHE_FORMAT = 1
ADD_CHUNK_ROWS = 16384

log = logging.getLogger("twotower.miners")

T = TypeVar("T")


@dataclass(frozen=True)
class BuildInfo:
    """How a miner got its index.

    source: "built" (made now), "loaded" (read from the cache) or "direct"
    (nothing to build: the search runs over the bank itself).
    seconds: wall time of the build or load; path: the cache entry, if any.
    """

    source: str
    seconds: float
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what crosses the worker pipe and lands in metrics)."""
        return asdict(self)


class IndexCache:
    """Built indexes under `cache_dir` (None: no cache, every build builds)."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None):
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    def path(
        self, bank: np.ndarray, fingerprint: str | None, miner: str, params: Mapping[str, Any]
    ) -> Path | None:
        """Where the index of `miner` with `params` over bank (M, D) lives (it may not exist yet).

        fingerprint: the bank's (None: read the whole bank once to hash it, as
        Dataset.fingerprint does). Returns None without a cache dir.
        """
        if self.cache_dir is None:
            return None
        if fingerprint is None:
            from twotower.data.dataset import bank_digest

            fingerprint = bank_digest(bank)
        key = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "miner": miner, **params}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.cache_dir / f"{miner}-{digest}.index"

    def load_or_build(
        self,
        path: Path | None,
        build: Callable[[], T],
        save: Callable[[T, str], None],
        load: Callable[[str], T],
        what: str = "index",
    ) -> tuple[T, BuildInfo]:
        """Load the index at `path` if it is there, else `build()` it and `save` it there.

        build() -> index; save(index, filename); load(filename) -> index.
        what: the index in words with its size, for progress ("faiss HNSW32 over 3,000 x 16 rows").
        An entry that fails to load is rebuilt and replaced, with a warning.
        """
        start = time.perf_counter()
        if path is not None and path.exists():
            try:
                with progress.task(Phase.LOAD_INDEX, f"{what} from {path}", announce=True):
                    index = load(str(path))
            except (RuntimeError, OSError) as error:
                log.warning("cached index %s is unreadable (%s); rebuilding", path, error)
            else:
                info = BuildInfo("loaded", time.perf_counter() - start, str(path))
                log.info("loaded index %s in %.1f s", path, info.seconds)
                return index, info
        with progress.task(Phase.BUILD_INDEX, what, announce=True):
            index = build()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with (
                    replacing(path) as partial,
                    progress.task("save-index", f"to {path}", phase=False),
                ):
                    save(index, str(partial))
        info = BuildInfo("built", time.perf_counter() - start, None if path is None else str(path))
        log.info("built index %s in %.1f s", path or "(not cached)", info.seconds)
        return index, info


def add_in_chunks(
    add: Callable[[np.ndarray, int], None], bank: np.ndarray, desc: str, chunk_rows: int = 0
) -> None:
    """Call add(bank[start:stop], start) over bank (M, D) in row chunks, as the
    "add-to-index" progress task (`twotower.progress`).

    Each chunk is a view of the bank (of the memory map), never a copy of the whole.
    """
    chunk_rows = chunk_rows or ADD_CHUNK_ROWS
    rows = len(bank)
    with progress.task("add-to-index", f"{desc}: {rows:,} rows", rows, "rows", phase=False) as task:
        for start in range(0, rows, chunk_rows):
            chunk = bank[start : start + chunk_rows]
            add(chunk, start)
            task.advance(len(chunk))

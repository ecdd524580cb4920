"""Chunked passes over big arrays and files, with a progress bar on the big ones.

Every pass over data that could be larger than memory (validation, the bank's
fingerprint, streaming a compressed .npz member, writing a synthetic dataset)
goes through `row_ranges` or `progress`, so the chunk size lives in one place.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from tqdm import tqdm

CHUNK_BYTES = 16 << 20  # bytes per chunk: big enough to stream well, small enough to stay cheap
PROGRESS_MIN_BYTES = 256 << 20  # smaller passes finish too fast to need a bar


def progress(total_bytes: int, desc: str) -> tqdm:
    """A byte-counting tqdm bar on stderr, shown only for big passes on a terminal."""
    return tqdm(
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        disable=True if total_bytes < PROGRESS_MIN_BYTES else None,  # None: off when not a tty
    )


def row_ranges(num_rows: int, row_bytes: int, desc: str) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering range(num_rows), about CHUNK_BYTES each.

    row_bytes is the size of one row; the bar (see `progress`) advances as each range is done.
    """
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    with progress(num_rows * row_bytes, desc) as bar:
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            yield start, stop
            bar.update((stop - start) * row_bytes)

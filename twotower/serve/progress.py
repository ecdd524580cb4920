"""Progress of a long pass over rows: a line on stderr every 30 s, terminal or not."""

from __future__ import annotations

import sys
import time
from typing import TextIO

EVERY_SECONDS = 30.0


class RowProgress:
    """Counts rows done; prints `twotower: LABEL: done/total rows (share), rate` on `stream`
    when started, at least every `every` seconds, and when finished."""

    def __init__(
        self, label: str, total: int, every: float = EVERY_SECONDS, stream: TextIO | None = None
    ):
        self.label, self.total, self.every = label, total, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self.last = time.monotonic()
        self._say(f"{total} rows")

    def update(self, rows: int) -> None:
        """`rows` more are done; print a line if `every` seconds passed since the last."""
        self.done += rows
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._say(self._status(now))

    def finish(self, what: str = "") -> None:
        """Print the final line: rows, seconds, rate, and `what` (e.g. the file written)."""
        self._say(self._status(time.monotonic()) + (f"; {what}" if what else ""))

    def _status(self, now: float) -> str:
        seconds = max(now - self.started, 1e-9)
        share = self.done / self.total if self.total else 1.0
        return (
            f"{self.done}/{self.total} rows ({share:.0%}) in {seconds:.1f} s, "
            f"{self.done / seconds:.0f} rows/s"
        )

    def _say(self, text: str) -> None:
        print(f"twotower: {self.label}: {text}", file=self.stream, flush=True)

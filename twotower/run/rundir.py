"""The run directory: where each file of a run lives, and the two logs that outlive a crash.

config.json      the resolved TrainConfig
metrics.jsonl    one JSON object per step or event, flushed line by line
log.txt          human-readable log, flushed line by line
checkpoints/     step-NNNNNNN/ + LATEST (twotower.training.checkpoint)
mined/           hard-negative tables (twotower.training.negatives.mining)
crashes/         one JSON report per abnormal exit (twotower.guard.supervisor)
faults/          fire-once markers of injected faults (twotower.process.faults)
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from twotower.atomic import naming

LOGGER_NAME = "twotower"
BASELINES_EVENT = "baselines"  # metrics.jsonl's record of the baselines (run_picture reads it)


class RunDir:
    """Paths of one run directory; creates the directory tree on `prepare()`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.log = self.root / "log.txt"
        self.checkpoints = self.root / "checkpoints"
        self.mined = self.root / "mined"
        self.crashes = self.root / "crashes"
        self.faults = self.root / "faults"
        self.heartbeat = self.root / "heartbeat.json"

    def prepare(self) -> RunDir:
        for path in (self.root, self.checkpoints, self.mined, self.crashes):
            path.mkdir(parents=True, exist_ok=True)
        return self


def runs_nearby(path: str | Path, most: int = 5) -> list[Path]:
    """Run directories (holding a config.json) inside `path`, beside it and under ./runs,
    newest first, at most `most`: what a user who named a run that is not there may mean."""
    path = Path(path)
    places = {path, path.parent, Path("runs")}
    found = {
        child
        for place in places
        if place.is_dir()
        for child in place.iterdir()
        if (child / "config.json").is_file()
    }
    return sorted(found, key=lambda run: (run / "config.json").stat().st_mtime, reverse=True)[:most]


def not_a_run(path: str | Path) -> str:
    """The one line for a path that holds no run: what is missing, and the runs nearby."""
    path = Path(path)
    what = "does not exist" if not path.exists() else "holds no config.json"
    nearby = runs_nearby(path)
    hint = (
        "runs nearby: " + ", ".join(str(run) for run in nearby)
        if nearby
        else "give the --out of a run (without --out, a run goes to runs/YYYYmmdd-HHMMSS)"
    )
    return f"{path}: {what}, so it is no twotower run directory; {hint}"


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and flushes each line.

    A line reaches the operating system as soon as it is written, so a crash
    (even SIGKILL) loses nothing that was logged before it.
    """

    def __init__(self, path: Path, also: Callable[[dict[str, Any]], None] | None = None):
        self.path = path
        torn = path.is_file() and path.stat().st_size > 0 and not _ends_a_line(path)
        self._file: TextIO = path.open("a", encoding="utf-8", buffering=1)
        if torn:  # a full disk or a kill cut the last line: the next one starts afresh
            self._file.write("\n")
        self._also = also  # gets each record too (TensorBoard)
        self._lock = threading.Lock()  # a background mining reports miner events too

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Log {"event": event, "time": unix seconds, **fields}; returns the record."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=_plain) + "\n"
        with self._lock, naming(self.path):
            self._file.write(line)
            self._file.flush()
        if self._also is not None:
            self._also(record)
        return record

    def close(self) -> None:
        self._file.close()


def _ends_a_line(path: Path) -> bool:
    with path.open("rb") as file:
        file.seek(-1, 2)
        return file.read(1) == b"\n"


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars and paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def open_log(path: Path, echo: bool = True) -> logging.Logger:
    """The 'twotower' logger writing to log.txt (flushed per record) and, if echo, stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    logger.propagate = False
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    if echo:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("twotower: %(message)s"))
        logger.addHandler(console)
    return logger

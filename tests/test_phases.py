"""The trainer's progress sink: which phase the heartbeat names, when it beats (progress and a
worker's CPU time only, so a stall stays a stall), and the progress lines a log gets without a
terminal."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from twotower import progress
from twotower.training.phases import BEAT_EVERY, PhaseReporter


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def sink() -> Iterator[tuple[PhaseReporter, list[tuple[str, dict]], Recorder]]:
    beats: list[tuple[str, dict]] = []
    logger = logging.getLogger("twotower.test-phases")
    recorder = Recorder()
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    reporter = PhaseReporter(
        lambda phase, fields: beats.append((phase, fields)),
        logger,
        line_every=0.3,
        first_line_after=0.2,
    )
    previous = progress.install(reporter)
    yield reporter, beats, recorder
    progress.install(previous)
    reporter.close()
    logger.removeHandler(recorder)


def test_the_outermost_named_task_is_the_phase_and_the_innermost_its_progress(sink) -> None:
    reporter, beats, recorder = sink
    reporter.enter("load")
    with (
        progress.task("build-index", "faiss IVF8,Flat over 100 x 4 bank rows", announce=True),
        progress.task("add-to-index", "100 rows", 100, "rows", phase=False) as task,
    ):
        task.advance(40)
    assert beats[0][0] == "load"
    inner = [fields["progress"] for phase, fields in beats if "progress" in fields]
    assert {beat[0] for beat in beats[1:-1]} == {"build-index"}
    assert [p["name"] for p in inner] == ["build-index", "add-to-index", "build-index"]
    assert (inner[1]["total"], inner[1]["unit"]) == (100, "rows")
    assert beats[-1] == ("load", {})  # the tasks ended: back to the trainer's phase
    assert recorder.lines[0] == "build-index: faiss IVF8,Flat over 100 x 4 bank rows"
    assert recorder.lines[-1].startswith("build-index: done in ")


def test_only_progress_or_cpu_time_beats(sink) -> None:
    """A worker whose CPU time stands still (a stall) does not move the heartbeat."""
    reporter, beats, _ = sink
    with progress.task("build-index", "waiting on a worker"):
        before = len(beats)
        for cpu in (1.0, 1.0, 1.0, 2.5, 2.5):
            time.sleep(BEAT_EVERY + 0.05)
            progress.alive("miner worker pid 1", cpu)
        alive = [fields["waiting_on"] for _, fields in beats[before:]]
    assert alive == [
        {"source": "miner worker pid 1", "cpu_s": 1.0},
        {"source": "miner worker pid 1", "cpu_s": 2.5},
    ]


def test_a_long_task_gets_lines_without_a_terminal_while_nothing_advances(sink) -> None:
    """The ticker writes the lines, so they come while the main thread sits in one call."""
    reporter, _, recorder = sink

    def shown() -> list[str]:
        return [line for line in recorder.lines if line.startswith("encode: mine: 5,000")]

    with progress.task("encode", "mine: 5,000 queries on numpy", 5000, "queries") as task:
        task.advance(1000)
        deadline = time.monotonic() + 30  # a first line after 0.2 s, then one every 0.3 s
        while len(shown()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(shown()) >= 2
    assert "1,000 / 5,000 queries (20%)" in shown()[0]
    assert recorder.lines[-1].startswith("encode: 1,000 queries in ")  # the end, with its rate
    assert recorder.lines[-1].endswith(" queries/s)")


def test_relayed_tasks_from_a_dead_worker_are_closed(sink) -> None:
    reporter, beats, _ = sink
    record = progress.Task("load-index", "faiss HNSW32 from cache", announce=True).as_dict()
    progress.relay("start", record)
    assert reporter.phase() == "load-index"
    progress.end_relayed()  # the worker died mid-load
    assert reporter.phase() == "load" and not reporter.tasks

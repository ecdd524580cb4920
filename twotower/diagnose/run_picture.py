"""What `twotower report` draws, as data: a run's series and its event markers.

Built from the run directory alone (metrics.jsonl, crashes/*.json), with no
plotting library, so tests check the numbers behind every line and marker.
A step replayed after a restart keeps its last record: the line shows the
path the final model took.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twotower.config import METRICS
from twotower.run.rundir import BASELINES_EVENT, RunDir, read_metrics

SMOOTHING = 0.9  # weight of the past in the exponential moving average of noisy series
STEP_SERIES = {
    "loss": "loss",
    "grad_norm": "gradient norm",
    "lr": "learning rate",
    "ms": "step time (ms)",
    "rss_kb": "RSS (KiB)",
}


@dataclass
class Series:
    """One line: x = steps completed, y = values (float), both the same length."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(float(value))


@dataclass(frozen=True)
class Marker:
    """A vertical line at `step`: kind is restart, crash, switch, resume, miner-crash,
    miner-restart, miner-switch or interrupted; label says what happened."""

    kind: str
    step: int
    label: str


@dataclass
class RunPicture:
    """A run as data: series by name (see `run_picture`), markers in time order."""

    run: Path
    series: dict[str, Series]
    markers: list[Marker]

    def marker_kinds(self) -> set[str]:
        return {marker.kind for marker in self.markers}


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return out


def _last_per_step(records: list[dict[str, Any]], key: str) -> Series:
    """Series of `key` over step records, the last record of each step winning, by step."""
    latest: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if value is not None and np.isfinite(value):
            latest[int(record["step"])] = float(value)
    series = Series()
    for step in sorted(latest):
        series.add(step, latest[step])
    return series


def _crash_markers(run: RunDir, records: list[dict[str, Any]]) -> list[Marker]:
    """One marker per crash report in crashes/ and per crash event naming none."""
    markers, reported = [], set()
    for path in sorted(run.crashes.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        reported.add(f"crashes/{path.name}")
        where = report.get("where") or {}
        how = report.get("exit", {}).get("signal") or f"exit {report.get('exit', {}).get('code')}"
        kind = "miner-crash" if report.get("process") == "miner worker" else "crash"
        label = f"{report.get('label', path.stem)}: {how}"
        if where.get("phase"):
            label += f" in {where['phase']}"
        markers.append(Marker(kind, int(where.get("step") or 0), label))
    for record in records:
        if record["event"] in ("crash", "miner-crash") and record.get("report") not in reported:
            how = record.get("signal") or record.get("how", "")
            markers.append(Marker(record["event"], int(record.get("step") or 0), str(how)))
    return markers


def _event_marker(record: dict[str, Any], crashed_at: int) -> Marker | None:
    """The marker of a restart, switch, resume or interruption record; None for others.

    crashed_at: the step of the last crash before it (where a supervisor's switch belongs).
    """
    event, step = record["event"], int(record.get("step") or 0)
    if event == "restart":
        return Marker(
            "restart",
            int(record.get("from_step") or 0),
            f"attempt {record.get('attempt')}: {record.get('backend')}/{record.get('miner')}",
        )
    if event == "switch":
        what = f"{record.get('role')} {record.get('previous')} -> {record.get('to')}"
        return Marker("switch", crashed_at, what)
    if event == "miner-switch":
        return Marker(
            "miner-switch", step, f"miner {record.get('previous')} -> {record.get('miner')}"
        )
    if event == "miner-restart":
        return Marker("miner-restart", step, f"miner {record.get('miner')} restarted")
    if event == "start" and step > 0:
        return Marker("resume", step, f"resumed at step {step} on {record.get('backend')}")
    if event == "interrupted":
        return Marker("interrupted", step, str(record.get("signal")))
    return None


def _baseline_series(records: list[dict[str, Any]], steps: list[int]) -> dict[str, Series]:
    """`baseline:<name>:<metric>` of the run's last baselines record (they are logged once,
    with no step: the parameter-free queries never change), drawn flat from the first of
    `steps` to the last."""
    logged = [r for r in records if r["event"] == BASELINES_EVENT]
    if not logged or not steps:
        return {}
    span = [min(steps), max(steps)]
    return {
        f"baseline:{name}:{key}": Series(span, [float(metrics[key])] * 2)
        for name, metrics in logged[-1].items()
        if isinstance(metrics, dict)
        for key in METRICS
        if key in metrics
    }


def run_picture(run_dir: str | Path) -> RunPicture:
    """The series and markers of a run directory.

    Series: loss, grad_norm, lr (if logged), ms, rss_kb and their smoothed `*_smooth`
    (loss, grad_norm) per step; `eval:<metric>` (recall@1/10/100, mrr@100) per evaluation
    and `baseline:<name>:<metric>` (a flat line over the run's steps) for each baseline the
    run logged; `mining:seconds` and
    `mining:recall` (a recall probe, where logged) per mining. Markers: see `Marker`.
    """
    run = RunDir(run_dir)
    records = read_metrics(run.metrics) if run.metrics.exists() else []
    steps = [r for r in records if r["event"] in ("step", "nonfinite")]
    series = {key: _last_per_step(steps, key) for key in STEP_SERIES}
    for key in ("loss", "grad_norm"):
        series[f"{key}_smooth"] = Series(series[key].steps, smooth(series[key].values))
    evals = [r for r in records if r["event"] == "eval"]
    for key in METRICS:
        series[f"eval:{key}"] = _last_per_step(evals, key)
    series.update(_baseline_series(records, [*series["loss"].steps, *series["eval:mrr@100"].steps]))
    mined = [r for r in records if r["event"] == "mined"]
    series["mining:seconds"] = _last_per_step(mined, "seconds")
    series["mining:recall"] = _last_per_step(mined, "recall")
    markers = _crash_markers(run, records)
    crashed_at = 0
    for record in records:
        if record["event"] == "crash":
            crashed_at = int(record.get("step") or 0)
        marker = _event_marker(record, crashed_at)
        if marker is not None:
            markers.append(marker)
    markers.sort(key=lambda marker: marker.step)
    return RunPicture(run.root, {k: v for k, v in series.items() if v.steps}, markers)

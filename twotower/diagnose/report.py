"""`twotower report`: a run drawn with matplotlib, as a PNG or an HTML page.

The data comes from `run_picture` (tested on its own); this module only draws
it: loss and gradient norm (raw and smoothed), learning rate, held-out metrics
(and baselines), each mining's duration (and recall probe), step time and RSS,
with a vertical line for every restart, crash, engine switch and resume.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twotower.atomic import replace_file
from twotower.config import METRICS
from twotower.diagnose.run_picture import RunPicture, run_picture
from twotower.errors import UsageError
from twotower.run.rundir import RunDir, not_a_run

MARKER_COLOURS = {
    "crash": "tab:red",
    "miner-crash": "tab:orange",
    "restart": "tab:purple",
    "switch": "tab:brown",
    "miner-switch": "tab:brown",
    "miner-restart": "tab:pink",
    "resume": "tab:green",
    "interrupted": "tab:gray",
}
FORMATS = (".png", ".html")
BASELINE_STYLES = ("--", ":", "-.")  # one line style for each baseline (last item, context mean)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "twotower report needs matplotlib: pip install 'twotower[report]'"
        ) from None
    return plt


def _line(axis: Any, picture: RunPicture, name: str, **style: Any) -> bool:
    series = picture.series.get(name)
    if series is None:
        return False
    axis.plot(series.steps, series.values, **style)
    return True


def _draw_loss(axis: Any, picture: RunPicture) -> None:
    _line(axis, picture, "loss", color="tab:blue", alpha=0.3, linewidth=0.7, label="loss")
    _line(axis, picture, "loss_smooth", color="tab:blue", label="loss (smoothed)")
    axis.set_ylabel("InfoNCE loss")


def _draw_gradient(axis: Any, picture: RunPicture) -> None:
    _line(
        axis,
        picture,
        "grad_norm",
        color="tab:olive",
        alpha=0.3,
        linewidth=0.7,
        label="gradient norm",
    )
    _line(axis, picture, "grad_norm_smooth", color="tab:olive", label="gradient norm (smoothed)")
    axis.set_ylabel("gradient norm")
    if "lr" in picture.series:
        lr = axis.twinx()
        _line(lr, picture, "lr", color="black", linestyle=":", label="learning rate")
        lr.set_ylabel("learning rate")


def _draw_quality(axis: Any, picture: RunPicture) -> None:
    """Each evaluation's metrics (one colour a metric), each baseline flat in the same colour
    (one line style a baseline, named once in the legend)."""
    names = sorted({name.split(":")[1] for name in picture.series if name.startswith("baseline:")})
    for i, metric in enumerate(METRICS):
        colour = f"C{i}"
        _line(axis, picture, f"eval:{metric}", color=colour, marker="o", label=metric)
        for name, style in zip(names, BASELINE_STYLES, strict=False):
            label = f"baseline: {name}" if i == 0 else None
            _line(
                axis,
                picture,
                f"baseline:{name}:{metric}",
                color=colour,
                linestyle=style,
                label=label,
            )
    axis.set_ylabel("held-out")
    axis.set_ylim(-0.02, 1.02)


def _draw_mining(axis: Any, picture: RunPicture) -> None:
    seconds = picture.series.get("mining:seconds")
    if seconds is not None:
        width = max(1, _span(picture) / 100)
        axis.bar(seconds.steps, seconds.values, width=width, color="tab:cyan", label="mining (s)")
    if "mining:recall" in picture.series:
        probe = axis.twinx()
        _line(
            probe, picture, "mining:recall", color="tab:red", marker="x", label="miner recall probe"
        )
        probe.set_ylabel("recall probe")
    axis.set_ylabel("mining (s)")


def _draw_cost(axis: Any, picture: RunPicture) -> None:
    style = {"color": "tab:gray", "linestyle": "", "marker": ".", "markersize": 2}
    _line(axis, picture, "ms", label="step time (ms)", **style)
    axis.set_ylabel("step time (ms)")
    if "rss_kb" in picture.series:
        memory = axis.twinx()
        rss = picture.series["rss_kb"]
        memory.plot(
            rss.steps, [kb / 1024 for kb in rss.values], color="tab:purple", label="RSS (MiB)"
        )
        memory.set_ylabel("RSS (MiB)")


# The panels top to bottom below the events: the series each draws (a panel whose series the
# run never logged takes no room), and how to draw it.
PANELS: list[tuple[tuple[str, ...], Callable[[Any, RunPicture], None]]] = [
    (("loss",), _draw_loss),
    (("grad_norm", "lr"), _draw_gradient),
    (tuple(f"eval:{metric}" for metric in METRICS), _draw_quality),
    (("mining:seconds", "mining:recall"), _draw_mining),
    (("ms", "rss_kb"), _draw_cost),
]


def _panels(plt: Any, picture: RunPicture) -> tuple[Any, Any | None, list[Any]]:
    """(figure, the events axis or None on a run without markers, the data axes): one panel
    for each of PANELS with a series in `picture`, and the events panel only where a marker is."""
    drawn = [draw for names, draw in PANELS if any(name in picture.series for name in names)]
    heights = ([1.4] if picture.markers else []) + [1.0] * len(drawn)
    figure, axes = plt.subplots(
        len(heights),
        1,
        figsize=(10, 2.4 * sum(heights)),
        sharex=True,
        height_ratios=heights,
        squeeze=False,
    )
    axes = list(axes[:, 0])
    events = axes.pop(0) if picture.markers else None
    for axis, draw in zip(axes, drawn, strict=True):
        draw(axis, picture)
    axes[-1].set_xlabel("steps completed")
    return figure, events, axes


def _span(picture: RunPicture) -> int:
    steps = [s for series in picture.series.values() for s in series.steps]
    return max(steps, default=1) - min(steps, default=0)


def _mark(events: Any | None, axes: list[Any], picture: RunPicture) -> None:
    """A vertical line per marker in every data panel; the events panel lists them, one row
    each; a legend in every panel that labelled a line."""
    if events is not None:
        for row, marker in enumerate(picture.markers):
            colour = MARKER_COLOURS.get(marker.kind, "black")
            for axis in axes:
                axis.axvline(marker.step, color=colour, linestyle="--", linewidth=1, alpha=0.8)
            events.plot([marker.step], [row], marker="v", color=colour)
            events.annotate(
                f" step {marker.step}: {marker.kind}: {marker.label}",
                (marker.step, row),
                fontsize=7,
                color=colour,
                va="center",
            )
        events.set_ylim(len(picture.markers), -1)
        events.set_yticks([])
        events.set_ylabel("events")
    for axis in axes:
        handles, _ = axis.get_legend_handles_labels()
        if handles:
            axis.legend(fontsize=7, loc="upper right")


def draw(picture: RunPicture, out: Path) -> Path:
    """Draw `picture` into `out` (.png, or .html embedding the PNG and a table of markers)."""
    if out.suffix not in FORMATS:
        raise UsageError(f"--out {out}: the report is written as {' or '.join(FORMATS)}")
    plt = _pyplot()
    figure, events, axes = _panels(plt, picture)
    _mark(events, axes, picture)
    figure.suptitle(f"twotower run {picture.run.name}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        replace_file(out, buffer.getvalue())
        return out
    rows = "".join(
        f"<tr><td>{m.step}</td><td>{html.escape(m.kind)}</td><td>{html.escape(m.label)}</td></tr>"
        for m in picture.markers
    )
    image = base64.b64encode(buffer.getvalue()).decode()
    replace_file(
        out,
        f"<!doctype html><title>twotower run {html.escape(picture.run.name)}</title>"
        f'<img src="data:image/png;base64,{image}">'
        f"<table><tr><th>step</th><th>event</th><th>what</th></tr>{rows}</table>\n",
    )
    return out


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw run directory `run` into `out` (default RUN/report.png); returns the path."""
    run = Path(run)
    if not RunDir(run).config.is_file():
        raise UsageError(not_a_run(run))
    if not RunDir(run).metrics.is_file():
        raise UsageError(f"{run}: no metrics.jsonl (the run has not logged a step yet)")
    return draw(run_picture(run), Path(out) if out else run / "report.png")

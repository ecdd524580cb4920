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
from pathlib import Path
from typing import Any

from twotower.atomic import replace_file
from twotower.diagnose.run_picture import RunPicture, run_picture
from twotower.errors import UsageError

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


def _panels(plt: Any, picture: RunPicture) -> Any:
    figure, axes = plt.subplots(
        6, 1, figsize=(10, 14), sharex=True, height_ratios=[1.4, 1, 1, 1, 1, 1]
    )
    _, loss, grad, quality, mining, cost = axes
    _line(loss, picture, "loss", color="tab:blue", alpha=0.3, linewidth=0.7, label="loss")
    _line(loss, picture, "loss_smooth", color="tab:blue", label="loss (smoothed)")
    loss.set_ylabel("InfoNCE loss")
    _line(
        grad,
        picture,
        "grad_norm",
        color="tab:olive",
        alpha=0.3,
        linewidth=0.7,
        label="gradient norm",
    )
    _line(grad, picture, "grad_norm_smooth", color="tab:olive", label="gradient norm (smoothed)")
    grad.set_ylabel("gradient norm")
    if "lr" in picture.series:
        lr = grad.twinx()
        _line(lr, picture, "lr", color="black", linestyle=":", label="learning rate")
        lr.set_ylabel("learning rate")
    for i, metric in enumerate(("recall@1", "recall@10", "recall@100", "mrr@100")):
        colour = f"C{i}"
        _line(quality, picture, f"eval:{metric}", color=colour, marker="o", label=metric)
        _line(
            quality,
            picture,
            f"baseline:{metric}",
            color=colour,
            linestyle="--",
            label=f"baseline {metric}",
        )
    quality.set_ylabel("held-out")
    quality.set_ylim(-0.02, 1.02)
    seconds = picture.series.get("mining:seconds")
    if seconds is not None:
        mining.bar(
            seconds.steps,
            seconds.values,
            width=max(1, _span(picture) / 100),
            color="tab:cyan",
            label="mining (s)",
        )
    if "mining:recall" in picture.series:
        probe = mining.twinx()
        _line(
            probe, picture, "mining:recall", color="tab:red", marker="x", label="miner recall probe"
        )
        probe.set_ylabel("recall probe")
    mining.set_ylabel("mining (s)")
    _line(
        cost,
        picture,
        "ms",
        color="tab:gray",
        linestyle="",
        marker=".",
        markersize=2,
        label="step time (ms)",
    )
    cost.set_ylabel("step time (ms)")
    if "rss_kb" in picture.series:
        memory = cost.twinx()
        rss = picture.series["rss_kb"]
        memory.plot(
            rss.steps, [kb / 1024 for kb in rss.values], color="tab:purple", label="RSS (MiB)"
        )
        memory.set_ylabel("RSS (MiB)")
    cost.set_xlabel("steps completed")
    return figure, axes


def _span(picture: RunPicture) -> int:
    steps = [s for series in picture.series.values() for s in series.steps]
    return max(steps, default=1) - min(steps, default=0)


def _mark(axes: Any, picture: RunPicture) -> None:
    """A vertical line per marker in every panel; the top panel lists them, one row each."""
    events = axes[0]
    for row, marker in enumerate(picture.markers):
        colour = MARKER_COLOURS.get(marker.kind, "black")
        for axis in axes[1:]:
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
    for axis in axes[1:]:
        handles, _ = axis.get_legend_handles_labels()
        if handles:
            axis.legend(fontsize=7, loc="upper right")


def draw(picture: RunPicture, out: Path) -> Path:
    """Draw `picture` into `out` (.png, or .html embedding the PNG and a table of markers)."""
    if out.suffix not in FORMATS:
        raise UsageError(f"--out {out}: the report is written as {' or '.join(FORMATS)}")
    plt = _pyplot()
    figure, axes = _panels(plt, picture)
    _mark(axes, picture)
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
    if not (run / "metrics.jsonl").is_file():
        raise UsageError(f"{run}: no metrics.jsonl (not a twotower run directory)")
    return draw(run_picture(run), Path(out) if out else run / "report.png")

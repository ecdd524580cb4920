"""Side-by-side figures for a benchmark module: each case's median time, its ratio to a
baseline measured in the same run, and its compute rate against the machine's GEMM peak.

pytest-benchmark times each case; this collects the medians and prints one table
at the end of the module (and saves it as JSON beside the benchmark's own output).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 GEMM rate now (GFLOP/s): best of `repeats` size^3 matmuls."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


@dataclass
class Row:
    case: str
    median_s: float
    baseline: str | None = None
    flops: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RatioReport:
    """Medians by case name; `table()` renders ratios against each row's baseline."""

    title: str
    peak_gflops: float | None = None
    rows: dict[str, Row] = field(default_factory=dict)

    def add(
        self,
        case: str,
        benchmark: Any,
        baseline: str | None = None,
        flops: float | None = None,
        median_s: float | None = None,
        **extra: Any,
    ) -> None:
        """Record a finished pytest-benchmark fixture under `case`: its median, or
        `median_s` where the case measures its own per-step time (e.g. from a log)."""
        median = benchmark.stats.stats.median if median_s is None else median_s
        self.rows[case] = Row(case, median, baseline, flops, extra)
        benchmark.extra_info.update({"median_s": median, "baseline": baseline, **extra})

    def table(self) -> list[str]:
        lines = [self.title]
        if self.peak_gflops:
            lines.append(f"machine float32 GEMM peak (same run): {self.peak_gflops:.1f} GFLOP/s")
        lines.append(f"{'case':34s} {'median':>10s} {'ratio':>22s} {'GFLOP/s':>9s} {'% peak':>7s}")
        for row in self.rows.values():
            ratio = ""
            if row.baseline in self.rows:
                ratio = f"{row.median_s / self.rows[row.baseline].median_s:.3f}x {row.baseline}"
            rate = peak = ""
            if row.flops:
                gflops = row.flops / row.median_s / 1e9
                rate = f"{gflops:.1f}"
                if self.peak_gflops:
                    peak = f"{100 * gflops / self.peak_gflops:.0f}%"
            extra = " ".join(f"{k}={v}" for k, v in row.extra.items())
            timing = f"{row.median_s * 1e3:8.1f}ms"
            lines.append(f"{row.case:34s} {timing} {ratio:>22s} {rate:>9s} {peak:>7s} {extra}")
        return lines

    def publish(self, config: Any, out_dir: Path = Path(".benchmarks")) -> None:
        """Print the table through pytest's terminal (`config` is request.config) and save it
        as JSON. Called from a module fixture's teardown, where output is otherwise captured."""
        plugins = config.pluginmanager
        with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
            terminal = plugins.get_plugin("terminalreporter")
            terminal.write_line("")
            for line in self.table():
                terminal.write_line(line)
        out_dir.mkdir(exist_ok=True)
        slug = self.title.split(":")[0].replace(" ", "_").lower()
        rows = [row.__dict__ for row in self.rows.values()]
        payload = {"title": self.title, "peak_gflops": self.peak_gflops, "rows": rows}
        (out_dir / f"{slug}.json").write_text(json.dumps(payload, indent=2))

"""Shared by the benchmark modules: each module's ratio table, and skipping under
--benchmark-disable (there is nothing to measure then)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.report import RatioReport


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[RatioReport]:
    """The module's table, titled by its REPORT_TITLE, printed and saved at the module's end."""
    table = RatioReport(request.module.REPORT_TITLE)
    yield table
    table.publish(request.config)


@pytest.fixture(autouse=True)
def _measured_only(request: pytest.FixtureRequest) -> None:
    if "benchmark" in request.fixturenames and request.config.getoption("benchmark_disable"):
        pytest.skip("a benchmark: --benchmark-disable leaves it nothing to measure")

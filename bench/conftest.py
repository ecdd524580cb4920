"""Benchmarks measure; with --benchmark-disable there is nothing to measure, so they skip."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _measured_only(request: pytest.FixtureRequest) -> None:
    if "benchmark" in request.fixturenames and request.config.getoption("benchmark_disable"):
        pytest.skip("a benchmark: --benchmark-disable leaves it nothing to measure")

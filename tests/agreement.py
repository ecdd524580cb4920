"""Assertions over `twotower.agreement`: every cross-engine test compares through these."""

from __future__ import annotations

import numpy as np

from twotower.agreement import disagreement


def assert_agrees(
    actual: np.ndarray,
    expected: np.ndarray,
    dtype: np.dtype | type,
    what: str = "",
    extra_atol: float = 0.0,
) -> None:
    """Assert shape, dtype, finiteness and values agree; the message names the worst element."""
    problem = disagreement(actual, expected, dtype, extra_atol)
    assert problem is None, f"{what}: {problem}"


def assert_differs(
    actual: np.ndarray, expected: np.ndarray, dtype: np.dtype | type, what: str = ""
) -> None:
    """The negative control: a perturbed computation must NOT agree."""
    assert disagreement(actual, expected, dtype) is not None, f"{what}: agrees, but must not"

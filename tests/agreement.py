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
    """The negative control: a perturbed computation of the same shape and dtype, every value
    finite, must NOT agree in value. A control that broke into another shape, another dtype or
    NaN fails here: it differs, but not because the check can tell a wrong number."""
    actual = np.asarray(actual)
    broken = f"{what}: the control is broken, not different"
    assert actual.shape == np.shape(expected), f"{broken}: shape {actual.shape}"
    assert actual.dtype == np.dtype(dtype), f"{broken}: dtype {actual.dtype}"
    assert np.all(np.isfinite(actual)), f"{broken}: non-finite values"
    assert disagreement(actual, expected, dtype) is not None, f"{what}: agrees, but must not"

"""tests/agreement.py's two assertions: what each lets through and what it stops."""

from __future__ import annotations

import numpy as np
import pytest

from tests.agreement import assert_agrees, assert_differs

EXPECTED = np.linspace(-1.0, 1.0, 12).reshape(3, 4)


def test_a_negative_control_passes_only_on_a_finite_value_of_the_same_shape_and_dtype() -> None:
    shifted = (EXPECTED + 0.5).astype(np.float32)
    assert_differs(shifted, EXPECTED, np.float32)
    broken = {
        "agrees": EXPECTED.astype(np.float32),
        "shape": shifted[:2],
        "dtype": shifted.astype(np.float64),
        "non-finite": np.where(EXPECTED > 0.9, np.nan, shifted).astype(np.float32),
    }
    for why, actual in broken.items():
        with pytest.raises(AssertionError, match="must not" if why == "agrees" else why):
            assert_differs(actual, EXPECTED, np.float32, what=why)


def test_agreement_stops_a_value_past_float32s_tolerance() -> None:
    assert_agrees(EXPECTED.astype(np.float32), EXPECTED, np.float32)
    with pytest.raises(AssertionError):
        assert_agrees((EXPECTED + 1e-3).astype(np.float32), EXPECTED, np.float32)

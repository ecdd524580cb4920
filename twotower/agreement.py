"""How close an engine must come to the float64 reference: one tolerance per dtype.

Used by every cross-engine test and by `twotower replay`.

An engine's output is compared with the float64 reference as
|actual - expected| <= atol * scale + rtol * |expected|, where scale is the
largest |expected| in the array: rounding in a float32 sum of n products errs
in proportion to the largest terms, not to the one element being checked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# (rtol, atol relative to the array's largest element)
TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    # float64 paths differ only in summation order
    np.dtype(np.float64): (1e-9, 1e-11),
    # float32 engines at the tests' shapes (D=32, T=6, five AdamW steps): the worst
    # errors seen are about 5e-7 of the largest element; this allows ~6x that
    np.dtype(np.float32): (1e-5, 1e-6),
}

# Replaying a step of a real run (`twotower replay`): trained weights, real shapes and a sharp
# softmax (1 / temperature = 20) make float32 rounding larger than at the unit tests' shapes
# (seen: 4e-6 of the largest gradient at step 450 of the demo, D=64, H=128, Q=1024). What
# replay is for -- an engine that computes something else (a wrong gate, a missed mask, NaN) --
# errs by 1e-2 or more. When the loss itself is tiny (below about 1e-3) the gradient is a
# difference of nearly equal float32 numbers and no float32 engine meets even this.
REPLAY_TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-9, 1e-11),
    np.dtype(np.float32): (1e-3, 1e-4),
}


def disagreement(
    actual: np.ndarray,
    expected: np.ndarray,
    dtype: np.dtype | type,
    extra_atol: float = 0.0,
    tolerances: Mapping[np.dtype, tuple[float, float]] = TOLERANCES,
) -> str | None:
    """None if `actual` agrees with `expected` within dtype's tolerance, else what differs.

    extra_atol: an absolute allowance a caller adds, with its reason at the call site.
    tolerances: the (rtol, atol) table: TOLERANCES (tests) or REPLAY_TOLERANCES.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != expected {expected.shape}"
    if actual.dtype != np.dtype(dtype):
        return f"dtype {actual.dtype} != expected {np.dtype(dtype)}"
    if not np.all(np.isfinite(actual)):
        return f"{np.size(actual) - np.count_nonzero(np.isfinite(actual))} non-finite values"
    if actual.size == 0:
        return None
    rtol, atol = tolerances[np.dtype(dtype)]
    scale = float(np.max(np.abs(expected)))
    error = np.abs(actual.astype(np.float64) - expected)
    allowed = atol * scale + rtol * np.abs(expected) + extra_atol
    excess = error - allowed
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    if excess[worst] <= 0:
        return None
    return (
        f"worst element {tuple(int(i) for i in worst)}: {actual[worst]!r} vs expected "
        f"{expected[worst]!r} (|error| {error[worst]:.3g} > allowed {allowed[worst]:.3g}); "
        f"{int(np.count_nonzero(excess > 0))} of {excess.size} elements out of tolerance"
    )

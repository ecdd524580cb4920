"""Model selection on the held-out metric: which evaluation was the best, and when to stop.

The state (best value and step, evaluations since) rides in every checkpoint's meta, so a
resumed run compares with the same best and counts patience from where it was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Selection:
    """metric: the name compared (higher is better, e.g. mrr@100); best_value and best_step:
    the best evaluation so far (None before the first); stale: evaluations since it."""

    metric: str
    best_value: float | None = None
    best_step: int | None = None
    stale: int = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Count the evaluation at `step`; True when it beats the best so far (strictly)."""
        value = metrics[self.metric]
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best_step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """True once `patience` (> 0) evaluations in a row have not improved."""
        return patience > 0 and self.stale >= patience

    def state(self) -> dict[str, Any]:
        """JSON-ready state for a checkpoint's meta."""
        return asdict(self)

    @classmethod
    def restore(cls, metric: str, state: dict[str, Any] | None) -> Selection:
        """The selection a checkpoint's meta recorded; a fresh one if it recorded none or
        compared another metric."""
        if not state or state.get("metric") != metric:
            return cls(metric)
        return cls(metric, state.get("best_value"), state.get("best_step"), int(state["stale"]))

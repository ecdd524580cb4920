"""`Finding`: one check's verdict (ok / warn / fail), shared by doctor and its data checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "warn", "fail")


@dataclass(frozen=True)
class Finding:
    """One check's result: check name, status ok / warn / fail, the evidence, what to do.

    details: machine-readable evidence for --json (the OpenMP runtimes and their paths, sizes).
    """

    check: str
    status: str
    evidence: str
    action: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

"""The run directory's typed records: a checkpoint's meta.json and the heartbeat, each with its
format version. Written from these classes and read back into them, so a reader names a
field (`meta.step`) instead of a key it hopes is there.

meta.json, format 1: `format_version`, `step` (steps completed), `epoch`, `backend`, `miner`,
`config_hash`, `mined_table` (the table in use, None before the first mining), `search_params`,
`metrics` (the last evaluation), `selection` (best so far and patience), `mining` (the refresh
in flight: take, use, queries; absent when none) and `arrays` (name -> sha256, shape, dtype).
Every field but `step` may be missing from a checkpoint written before it existed and reads as
what such a checkpoint meant (no table, no refresh in flight, no selection, no metrics).

heartbeat.json, format 1 (a beat without `format_version` is the same, from before it was
written): `pid`, `step`, `phase`, `backend`, `miner`, `rss_kb`, `peak_rss_kb`, `cpu_s`, `time`,
and what the trainer describes (`threads`, `threadpools`, `openmp`, `progress`) in `extra`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CHECKPOINT_FORMAT = 1
READABLE_CHECKPOINT_FORMATS = (1,)
HEARTBEAT_FORMAT = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's meta.json (see the module docstring); `arrays` is filled by the writer."""

    step: int
    epoch: int | None = None
    backend: str | None = None
    miner: str | None = None
    config_hash: str | None = None
    mined_table: str | None = None
    search_params: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] | None = None
    mining: dict[str, Any] | None = None
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = CHECKPOINT_FORMAT

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CheckpointMeta:
        """The record of a meta.json document; keys no field has are ignored, a missing
        optional one reads as its default. Raises KeyError without `step`."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in doc.items() if key in known and value is not None}
        values["step"] = int(doc["step"])
        return cls(**values)

    @classmethod
    def read(cls, checkpoint: Path) -> CheckpointMeta:
        """The meta.json of a checkpoint directory, unverified (`load_checkpoint` verifies).
        Raises OSError, ValueError or KeyError when it is missing or malformed."""
        return cls.from_dict(json.loads((checkpoint / "meta.json").read_text()))

    def caller_fields(self) -> dict[str, Any]:
        """What the trainer gives `save_checkpoint` as meta: every field but those the writer
        sets (format_version, step, arrays); `mining` only while a refresh is in flight."""
        doc = asdict(self)
        for key in ("format_version", "step", "arrays"):
            del doc[key]
        if self.mining is None:
            del doc["mining"]
        return doc


@dataclass(frozen=True)
class Beat:
    """One heartbeat (see the module docstring): what the trainer is doing now."""

    pid: int
    step: int | None
    phase: str
    backend: str | None = None
    miner: str | None = None
    rss_kb: int = 0
    peak_rss_kb: int = 0
    cpu_s: float | None = None
    time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = HEARTBEAT_FORMAT

    def as_dict(self) -> dict[str, Any]:
        """The JSON document of heartbeat.json: the fields, `extra`'s keys beside them."""
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **doc}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Beat:
        """The record of a heartbeat.json document; keys no field has go to `extra`.
        Raises KeyError without pid or phase."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {key: value for key, value in doc.items() if key in known}
        extra = {key: value for key, value in doc.items() if key not in known}
        return cls(**{"step": None, **values, "pid": int(doc["pid"])}, extra=extra)

"""A setting resolved after the config is built, as a new copy: `TrainConfig` is frozen, so a
resolver (the data's, the bank's, the miner's, a torchrun restart's) returns `Resolved`, the
copy (`dataclasses.replace`, which validates it again) and the line the run logs about it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from twotower.config import TrainConfig
from twotower.knobs import default_text
from twotower.paths import shown_path


@dataclass(frozen=True)
class Resolved:
    """What a resolver returns: the config with a setting made concrete (a new copy) and the
    line the run logs about it, what changed and why (None: nothing changed)."""

    config: TrainConfig
    line: str | None = None


PATH_FIELDS = ("data", "out", "eval_data")  # shown as the user sees a path (relative, or ~)


def shown(name: str, value: Any) -> str:
    """A setting's value as the log shows it: unset, on / off, a path as the user sees it."""
    if value is None:
        return "unset"
    return shown_path(value) if name in PATH_FIELDS else default_text(value)


def changes(before: TrainConfig, after: TrainConfig) -> str:
    """The fields `after` sets differently, as flags in field order: "--hard-negatives 8 -> 0
    and --queue-size 4096 -> 0" ("" when none differs)."""
    changed = [
        f"--{f.name.replace('_', '-')} {shown(f.name, getattr(before, f.name))} -> "
        f"{shown(f.name, getattr(after, f.name))}"
        for f in fields(before)
        if getattr(before, f.name) != getattr(after, f.name)
    ]
    return " and ".join(changed)


def resolved_copy(config: TrainConfig, what: str, why: str, **settings: Any) -> Resolved:
    """config with `settings` as a new copy (validated again) and the line saying so: "WHAT:
    --flag old -> new and ..., since WHY" (no "since" when why is ""; None when nothing
    changed)."""
    after = replace(config, **settings)
    diff = changes(config, after)
    if not diff:
        return Resolved(after)
    return Resolved(after, f"{what}: {diff}" + (f", since {why}" if why else ""))

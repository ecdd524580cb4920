"""`knob`: a TrainConfig field with what its flag needs, its help, bounds and choices, and
whether it changes a run's numbers (`config.NUMERIC_FIELDS`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def knob(
    default: Any,
    help: str,
    no_help: str | None = None,
    *,
    numeric: bool = False,
    at_least: int | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field with its --help text, a sentence or two (`twotower train --help` adds
    the default); no_help: the text of its `--no-` flag, for a switch that has one. A callable
    default makes a fresh value each time. numeric: the field changes the numbers a run
    computes (a resume with another value is refused); at_least, choices: the values
    `TrainConfig.validate` accepts (None passes: it means "the default rule")."""
    metadata = {"help": help, "numeric": numeric, "at_least": at_least, "choices": choices}
    if no_help:
        metadata["no_help"] = no_help
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def default_text(value: Any) -> str:
    """A setting's value as --help and the log show it: on/off, a comma list, or the value."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)

"""A run's settings (RUN/config.json): the one reader and the one writer.

The file is the resolved `TrainConfig` as JSON (`TrainConfig.to_json`). It carries no version
of its own: a run written before an option existed simply lacks its key, and such a run did
what `ABSENT_MEANS` says (a plain GRU, a constant rate, ...), not what today's default does.
Every command that reads a run (train --resume, eval, export, replay, the torchrun guard) reads
its settings here, so an old run is read as the version that wrote it meant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twotower.atomic import replace_file
from twotower.config import ABSENT_MEANS, TrainConfig
from twotower.errors import UsageError
from twotower.run.rundir import not_a_run

SETTINGS_NAME = "config.json"

# What --resume takes from its own command line, never from the run's config.json: where the
# run is, that it continues, and whether this invocation is supervised (a supervised run's
# config.json is written by its child, which runs unsupervised).
PER_INVOCATION = ("out", "resume", "supervise")


def find_run(path: str | Path) -> Path:
    """The run directory that `path` (a run, its checkpoints/ or one checkpoint directory)
    belongs to: the nearest of path, its parent and grandparent holding a config.json.
    Raises UsageError when none does."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / SETTINGS_NAME).is_file():
            return candidate
    raise UsageError(not_a_run(path))


def read_settings(run: str | Path) -> dict[str, Any]:
    """The settings of the run in directory `run`, as the version that wrote them meant: a key
    the file lacks reads as `ABSENT_MEANS` says (a run made before that option existed), and a
    key no `TrainConfig` field has any more is left out. Returns field name -> value.
    Raises UsageError (one line) when config.json is missing or unreadable."""
    path = Path(run) / SETTINGS_NAME
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(not_a_run(run)) from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error})") from None
    if not isinstance(stored, dict):
        raise UsageError(f"{path}: unreadable (not a JSON object)")
    known = set(TrainConfig.field_names())
    return {**ABSENT_MEANS, **{key: value for key, value in stored.items() if key in known}}


def resumed_settings(run: str | Path) -> dict[str, Any]:
    """`read_settings` less `PER_INVOCATION`: what `--resume` continues with, the run's own
    settings, leaving where it is and how it is supervised to the resuming command."""
    stored = read_settings(run)
    return {key: value for key, value in stored.items() if key not in PER_INVOCATION}


def read_run_config(run: str | Path, **overrides: Any) -> TrainConfig:
    """The run's `TrainConfig` (`read_settings`), with `overrides` (field -> value) applied.
    Raises UsageError when a setting is invalid."""
    settings = {**read_settings(run), **overrides}
    return TrainConfig.from_dict(settings, source=str(Path(run) / SETTINGS_NAME))


def write_settings(run: str | Path, config: TrainConfig) -> Path:
    """Replace RUN/config.json with `config`, atomically and durably (a crash leaves the old
    file or the new one, never half of one). Returns the file's path."""
    path = Path(run) / SETTINGS_NAME
    replace_file(path, config.to_json(), durable=True)
    return path

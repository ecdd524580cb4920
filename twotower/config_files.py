"""Settings from files: a `--config FILE.toml|.json`, and the config.json of a run that
`--resume` continues. Both give a dict of `TrainConfig` fields for the CLI to merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twotower.config import ABSENT_MEANS, TrainConfig
from twotower.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# What --resume takes from its own command line, never from the run's config.json: where the
# run is, that it continues, and whether this invocation is supervised (a supervised run's
# config.json is written by its child, which runs unsupervised).
PER_INVOCATION = ("out", "resume", "supervise")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a .toml or .json file, keys with dashes or underscores."""
    path = Path(path)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise UsageError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {error}"
        ) from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(TrainConfig.field_names()))
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def read_stored_config(path: str | Path) -> dict[str, Any]:
    """The settings of a run's config.json that --resume continues with: a key the file
    lacks (a run made before that option existed) reads as what such a run did
    (ABSENT_MEANS); PER_INVOCATION keys are left to the command that resumes, and a key
    no field has any more is left out (as `numeric_differences` leaves it out)."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error}); cannot resume") from None
    kept = set(TrainConfig.field_names()) - set(PER_INVOCATION)
    return {**ABSENT_MEANS, **{key: value for key, value in stored.items() if key in kept}}

"""Settings from a `--config FILE.toml|.json`: a dict of `TrainConfig` fields for the CLI to
merge. A run's own config.json is read by `twotower.run.settings`, never here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twotower.config import TrainConfig
from twotower.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


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

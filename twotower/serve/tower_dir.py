"""An exported tower's directory: `tower.json` and its weights, read and written.

    tower.json          {"format_version", "kind", "dim", "hidden", "layers", "proj",
                         "residual", "weights", "extra_files", "source", "split"}
    tower.safetensors   every parameter under torch's names (always written: NumPy,
                        torch and the safetensors package all read it)
    tower.pt            `torch.save` of the state dict (--format torch)
    tower.onnx          the tower with dynamic batch and length (--format onnx)

`source` says which run and checkpoint it came from; `split` holds the run's
held-out split settings (eval_fraction, max_eval, seed), so `encode --rows
held-out` works from the export alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twotower.errors import UsageError
from twotower.serve import safetensors_file
from twotower.towers import TowerSpec

FORMAT_VERSION = 1
TOWER_JSON = "tower.json"
WEIGHTS = "tower.safetensors"
RESIDUAL_NONE = "none"


@dataclass
class TowerFiles:
    """An exported tower: its spec, its parameters (float32, torch names) and tower.json."""

    path: Path
    spec: TowerSpec
    params: dict[str, np.ndarray]
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> dict[str, Any] | None:
        """The run's held-out split settings (eval_fraction, max_eval, seed), if recorded."""
        split = self.doc.get("split")
        return dict(split) if isinstance(split, dict) else None


def tower_doc(spec: TowerSpec, **extra: Any) -> dict[str, Any]:
    """tower.json's contents for `spec`; `extra` (source, split, extra_files) added as is."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": spec.kind,
        "dim": spec.dim,
        "hidden": spec.hidden,
        "layers": spec.layers,
        "proj": spec.proj,
        "residual": spec.residual,
        "weights": WEIGHTS,
        **extra,
    }


def write_tower_files(
    directory: Path, spec: TowerSpec, params: dict[str, np.ndarray], **extra: Any
) -> dict[str, Any]:
    """Write tower.safetensors and tower.json into `directory`; returns tower.json's dict."""
    spec.check_state(params)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: np.asarray(params[name], dtype=np.float32) for name in spec.shapes()}
    safetensors_file.write(directory / WEIGHTS, weights, {"format": "pt"})
    doc = tower_doc(spec, **extra)
    (directory / TOWER_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def read_tower_files(path: str | os.PathLike[str]) -> TowerFiles:
    """Read an exported tower directory; UsageError (one line) naming what is missing or wrong."""
    directory = Path(path)
    doc_path = directory / TOWER_JSON
    if not doc_path.is_file():
        raise UsageError(f"{directory}: no {TOWER_JSON} (not a `twotower export` directory)")
    try:
        doc = json.loads(doc_path.read_text())
    except ValueError as error:
        raise UsageError(f"{doc_path}: unreadable ({error})") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{doc_path}: format_version {doc.get('format_version')!r}; this twotower reads "
            f"{FORMAT_VERSION}"
        )
    missing = [key for key in ("kind", "dim", "hidden", "layers", "proj") if key not in doc]
    if missing:
        raise UsageError(f"{doc_path}: missing {', '.join(missing)}")
    spec = TowerSpec(
        kind=doc["kind"],
        dim=int(doc["dim"]),
        hidden=int(doc["hidden"]),
        layers=int(doc["layers"]),
        proj=bool(doc["proj"]),
        residual=str(doc.get("residual", RESIDUAL_NONE)),
    )
    weights = directory / str(doc.get("weights", WEIGHTS))
    if not weights.is_file():
        raise UsageError(f"{directory}: no {weights.name} beside {TOWER_JSON}")
    params, _ = safetensors_file.read(weights)
    spec.check_state(params)
    return TowerFiles(directory, spec, {name: params[name] for name in spec.shapes()}, doc)

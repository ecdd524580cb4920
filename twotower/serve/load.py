"""`twotower.load_tower(DIR)`: an exported tower, as a torch module or a torch-free encoder."""

from __future__ import annotations

import os
from typing import Any

from twotower.errors import UsageError
from twotower.serve.tower_dir import TowerFiles, read_tower_files

ENGINES = ("torch", "numpy", "onnx")


def load_tower(path: str | os.PathLike[str], engine: str = "torch") -> Any:
    """The tower exported to directory `path` (`twotower export`).

    engine "torch": an `nn.Module` in eval mode, `tower(contexts, lengths)` on tensors
    (B, T, D) float32 and (B,) int64 -> (B, D); "numpy": a NumPy encoder that never imports
    torch; "onnx": onnxruntime over tower.onnx (`pip install 'twotower[onnx]'`). Each has
    `encode(contexts (B, T, D), lengths (B,)) -> unit query vectors (B, D) float32`.
    Raises UsageError (one line) for a missing or malformed directory or an unknown engine.
    """
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return encoder_for(read_tower_files(path), engine)


def encoder_for(files: TowerFiles, engine: str) -> Any:
    """The encoder of `engine` ("torch", "numpy", "onnx") for an exported tower's files."""
    if engine == "numpy":
        from twotower.serve.engines import NumpyTower

        return NumpyTower(files)
    if engine == "onnx":
        from twotower.serve.engines import OnnxTower

        return OnnxTower(files)
    from twotower.serve.torch_tower import torch_tower

    return torch_tower(files.spec, files.params)

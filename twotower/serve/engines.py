"""The tower without torch: a NumPy encoder (the numpy engine's forward) and an ONNX one.

Neither imports torch, so a service that only encodes needs numpy (and onnxruntime for ONNX).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twotower.backends.base import StepSettings
from twotower.backends.numpy_backend import NumpyBackend
from twotower.errors import UsageError
from twotower.serve.tower_dir import TowerFiles

ONNX_INPUTS = ("contexts", "lengths")  # (B, T, D) float32, (B,) int64
ONNX_OUTPUT = "queries"  # (B, D) float32


class NumpyTower:
    """tower.encode(contexts (B, T, D), lengths (B,)) -> unit query vectors (B, D) float32,
    computed by the numpy engine's forward (no torch)."""

    def __init__(self, files: TowerFiles):
        self.spec = files.spec
        self._engine = NumpyBackend(files.spec, StepSettings(), files.params)

    def encode(self, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """contexts (B, T, D), lengths (B,) -> (B, D) float32."""
        return self._engine.encode(contexts, lengths)

    __call__ = encode


class OnnxTower:
    """tower.encode(contexts, lengths) -> (B, D) float32 through onnxruntime and tower.onnx."""

    def __init__(self, files: TowerFiles):
        path = Path(files.path) / "tower.onnx"
        if not path.is_file():
            raise UsageError(f"{files.path}: no tower.onnx; export with --format onnx")
        try:
            import onnxruntime
        except ImportError:
            raise UsageError(
                "the onnx engine needs onnxruntime: pip install 'twotower[onnx]'"
            ) from None
        self.spec = files.spec
        self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def encode(self, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """contexts (B, T, D), lengths (B,) -> (B, D) float32."""
        contexts_name, lengths_name = ONNX_INPUTS
        feeds = {
            contexts_name: np.ascontiguousarray(contexts, np.float32),
            lengths_name: np.asarray(lengths, np.int64),
        }
        (queries,) = self._session.run(None, feeds)
        return np.asarray(queries, dtype=np.float32)

    __call__ = encode

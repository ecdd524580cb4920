"""The exported tower as a torch module, and its torch and ONNX files.

`ExportedTower` is the training engine's `QueryTower` (same parameter names,
same forward), called as `tower(contexts, lengths)`. Its GRU runs over the
whole padded sequence and reads each row's output at position length - 1: a
unidirectional GRU's output there depends on nothing after it, so this is the
packed-sequence result, and it exports to ONNX with dynamic batch and length
(packed sequences do not).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from twotower.backends.torch_backend import QueryTower
from twotower.serve.engines import ONNX_INPUTS, ONNX_OUTPUT
from twotower.towers import TowerSpec

GATHER = "gather"  # the GRU path used here: full sequence, output at length - 1
ONNX_OPSET = 17


class ExportedTower(QueryTower):
    """A trained query tower: tower(contexts (B, T, D) float32, lengths (B,) int64) -> (B, D).

    An `nn.Module`; `encode` takes and returns NumPy arrays.
    """

    def features(self, x: torch.Tensor, lengths: torch.Tensor, gru_path: str) -> torch.Tensor:
        if self.spec.kind != "gru" or gru_path != GATHER:
            return super().features(x, lengths, gru_path)
        active = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        outputs, _ = self.gru(torch.where(active[:, :, None], x, 0.0))  # (B, T, H)
        return outputs[torch.arange(x.shape[0]), lengths - 1]

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, gru_path: str = GATHER
    ) -> torch.Tensor:
        """x (B, T, D) float32, lengths (B,) int64 -> unit query vectors (B, D)."""
        return super().forward(x, lengths, gru_path)

    def encode(self, contexts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """contexts (B, T, D), lengths (B,) -> unit query vectors (B, D) float32."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(contexts, dtype=np.float32))
            return self(x, torch.as_tensor(np.asarray(lengths, dtype=np.int64))).numpy()


def torch_tower(spec: TowerSpec, params: dict[str, np.ndarray]) -> ExportedTower:
    """An ExportedTower holding `params`, in eval mode."""
    tower = ExportedTower(spec)
    tower.load_state_dict({name: torch.from_numpy(np.array(p)) for name, p in params.items()})
    return tower.eval()


def save_extra(
    directory: Path, spec: TowerSpec, params: dict[str, np.ndarray], format: str
) -> Path:
    """Write tower.pt (format "torch": the state dict) or tower.onnx ("onnx") into directory."""
    tower = torch_tower(spec, params)
    if format == "torch":
        path = directory / "tower.pt"
        torch.save(tower.state_dict(), path)
        return path
    path = directory / "tower.onnx"
    example = (torch.zeros(2, 3, spec.dim), torch.tensor([3, 1]))
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower,
            example,
            str(path),
            dynamo=False,
            input_names=list(ONNX_INPUTS),
            output_names=[ONNX_OUTPUT],
            opset_version=ONNX_OPSET,
            dynamic_axes={
                ONNX_INPUTS[0]: {0: "batch", 1: "length"},
                ONNX_INPUTS[1]: {0: "batch"},
                ONNX_OUTPUT: {0: "batch"},
            },
        )
    return path

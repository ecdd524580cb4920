"""The safetensors file format in NumPy: tensors by name, readable without torch.

A file is an 8-byte little-endian header length, a JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}})
padded with spaces to 8 bytes, then the tensors' bytes. The `safetensors`
package (and Hugging Face tooling) reads what `write` writes, and `read` reads
its files; writing it here keeps the format's few lines free of a dependency.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from twotower.errors import UsageError

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}
DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
ALIGN = 8
MAX_HEADER_BYTES = 100 << 20


def write(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` (name -> array of a DTYPES type, C order on disk) to `path`."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    offset = 0
    for name, array in arrays.items():
        if array.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {array.dtype} is not one of {sorted(DTYPES)}")
        header[name] = {
            "dtype": DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGN)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for array in arrays.values():
            file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def read(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, metadata) of a safetensors file; UsageError naming what is wrong."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise UsageError(f"{path}: not a safetensors file (shorter than its header length)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise UsageError(f"{path}: not a safetensors file (header length {size} is impossible)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as error:
        raise UsageError(f"{path}: unreadable safetensors header ({error})") from None
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES or not 0 <= begin <= end <= len(body):
            raise UsageError(f"{path}: tensor {name!r} has a dtype or offsets this reader refuses")
        dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
        array = np.frombuffer(body[begin:end], dtype=dtype).reshape(entry["shape"])
        tensors[name] = array.astype(dtype.newbyteorder("="))
    return tensors, metadata

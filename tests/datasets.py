"""Datasets for tests: small valid arrays written by hand, what loading them must give, and a
catalogue of broken ones.

The arrays come from plain NumPy here, never from twotower, so a test that
loads them checks twotower against an independent source; so do the expectations
(arrays read whole by np.load, contexts gathered by a Python loop, sha256 from hashlib).

BROKEN_DATASETS lists (case, make(tmp_dir) -> path, expected): loading `path`
must raise twotower.errors.DataError whose one-line message contains
`expected` (which names the file and the array). The CLI tests reuse it to
check exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pytest

    from twotower.data import Dataset

N, T, D, M = 60, 6, 8, 40  # samples, max length, vector size, bank rows


def small_arrays(layout: str = "ids", seed: int = 0) -> dict[str, np.ndarray]:
    """A valid dataset's arrays: bank (M, D) float32, lengths (N,), positives (N,) int64 and
    context_ids (N, T) int64 -1 padded (layout "ids") or contexts (N, T, D) float32."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((M, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=N).astype(np.int64)
    lengths[:T] = np.arange(1, T + 1)  # every length appears
    ids = rng.integers(0, M, size=(N, T)).astype(np.int64)
    ids[np.arange(T)[None, :] >= lengths[:, None]] = -1
    arrays = {"bank": bank, "lengths": lengths, "positives": rng.integers(0, M, size=N)}
    if layout == "ids":
        arrays["context_ids"] = ids
    else:
        contexts = rng.standard_normal((N, T, D)).astype(np.float32)
        contexts[ids < 0] = 0.0
        arrays["contexts"] = contexts
    return arrays


def write_dir(directory: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A user-made dataset directory (no manifest): one np.save per array."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        np.save(directory / f"{key}.npy", array, allow_pickle=array.dtype.hasobject)
    return directory


def write_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool) -> Path:
    """np.savez (members stored) or np.savez_compressed (members deflated)."""
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def age(*paths: Path, seconds: float = 60.0) -> None:
    """Move every file under `paths` `seconds` into the past: an old dataset, whose stamps
    twotower trusts for caching (a file written a moment ago is checked again)."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            mtime = file.stat().st_mtime_ns - int(seconds * 1e9)
            os.utime(file, ns=(mtime, mtime))


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes np.save would write for `array`."""
    buffer = BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# --- independent expectations ------------------------------------------------


def plain_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Every array of a dataset directory, read whole by np.load (no mmap)."""
    keys = ("bank", "contexts", "context_ids", "lengths", "positives")
    return {
        key: np.load(directory / f"{key}.npy")
        for key in keys
        if (directory / f"{key}.npy").exists()
    }


def expected_gather(arrays: dict[str, np.ndarray], rows: np.ndarray):
    """contexts (B, T, D) built one step at a time, zero past each length; lengths; positives."""
    lengths = arrays["lengths"][rows].astype(np.int64)
    seq_len = (arrays["contexts"] if "contexts" in arrays else arrays["context_ids"]).shape[1]
    contexts = np.zeros((len(rows), seq_len, arrays["bank"].shape[1]), dtype=np.float32)
    for b, row in enumerate(rows):
        for t in range(lengths[b]):
            if "contexts" in arrays:
                contexts[b, t] = arrays["contexts"][row, t]
            else:
                contexts[b, t] = arrays["bank"][arrays["context_ids"][row, t]]
    return contexts, lengths, arrays["positives"][rows].astype(np.int64)


def assert_gathers(dataset: Dataset, arrays: dict[str, np.ndarray], rows) -> None:
    """dataset.gather(rows) equals `expected_gather`, with its dtypes, C-contiguous."""
    rows = np.asarray(rows)
    got = dataset.gather(rows)
    for actual, expected, dtype in zip(
        got, expected_gather(arrays, rows), (np.float32, np.int64, np.int64), strict=True
    ):
        assert actual.dtype == dtype
        assert actual.flags.c_contiguous
        np.testing.assert_array_equal(actual, expected)


def mapped_from(array: np.ndarray, path: Path) -> bool:
    """True if `array` is a read-only memory map of the file `path`."""
    return (
        isinstance(array, np.memmap)
        and Path(array.filename) == path.resolve()
        and not array.flags.writeable
    )


def sha256_of_bank(bank: np.ndarray) -> str:
    """The bank's fingerprint as DESIGN says it, by hashlib: header line, then float32 rows."""
    rows, dim = bank.shape
    header = f"twotower-bank <f4 {rows}x{dim}\n".encode()
    return hashlib.sha256(header + np.ascontiguousarray(bank, dtype="<f4").tobytes()).hexdigest()


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Wrap module.name to count its calls; returns the one-element counter."""
    calls = [0]
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def rewrite(path: Path, index: tuple, value: float) -> None:
    """Save the .npy file at `path` again with array[index] = value: same size, new content."""
    array = np.load(path)
    array[index] = value
    np.save(path, array)


# --- the catalogue ---------------------------------------------------------


def _broken_dir(layout: str, key: str, change: Callable[[np.ndarray], np.ndarray]):
    def make(tmp: Path) -> Path:
        arrays = small_arrays(layout)
        arrays[key] = change(arrays[key].copy())
        return write_dir(tmp / "data", arrays)

    return make


def _groups(groups: np.ndarray):
    """A valid ids dataset plus groups.npy holding `groups`."""

    def make(tmp: Path) -> Path:
        return write_dir(tmp / "data", {**small_arrays("ids"), "groups": groups})

    return make


def _set(index: tuple, value, *more: tuple) -> Callable[[np.ndarray], np.ndarray]:
    """change(): set array[index] = value (and array[i] = value for each further index)."""

    def change(array: np.ndarray) -> np.ndarray:
        for where in (index, *more):
            array[where] = value
        return array

    return change


def _without(key: str, layout: str = "ids"):
    def make(tmp: Path) -> Path:
        arrays = small_arrays(layout)
        del arrays[key]
        return write_dir(tmp / "data", arrays)

    return make


def _both_layouts(tmp: Path) -> Path:
    return write_dir(
        tmp / "data", small_arrays("ids") | {"contexts": small_arrays("x")["contexts"]}
    )


def _file_replaced(key: str, content: bytes):
    def make(tmp: Path) -> Path:
        directory = write_dir(tmp / "data", small_arrays())
        (directory / f"{key}.npy").write_bytes(content)
        return directory

    return make


def _truncated_bank(tmp: Path) -> Path:
    directory = write_dir(tmp / "data", small_arrays())
    path = directory / "bank.npy"
    os.truncate(path, path.stat().st_size - 100)
    return directory


def _manifest(content: str | None = None, value: object = None):
    def make(tmp: Path) -> Path:
        directory = write_dir(tmp / "data", small_arrays())
        manifest = directory / "manifest.json"
        if content is None and value is None:
            manifest.mkdir()  # unreadable as a file
        else:
            manifest.write_text(content if content is not None else json.dumps(value))
        return directory

    return make


def _npz(compressed: bool, key: str | None = None, change=None, drop: str | None = None):
    def make(tmp: Path) -> Path:
        arrays = small_arrays()
        if key is not None:
            arrays[key] = change(arrays[key].copy())
        if drop is not None:
            del arrays[drop]
        return write_npz(tmp / "data.npz", arrays, compressed)

    return make


def _npz_short_member(compressed: bool):
    """A .npz whose bank member is cut short: its header promises more than its data."""

    def make(tmp: Path) -> Path:
        path = tmp / "data.npz"
        method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", compression=method) as archive:
            for key, array in small_arrays().items():
                data = npy_bytes(array)
                archive.writestr(f"{key}.npy", data[:-64] if key == "bank" else data)
        return path

    return make


def _file_with(content: bytes, name: str):
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return make


def _cut_in_half(tmp: Path) -> Path:
    path = write_npz(tmp / "data.npz", small_arrays(), compressed=False)
    os.truncate(path, path.stat().st_size // 2)
    return path


def _bank_fortran(tmp: Path) -> Path:
    arrays = small_arrays()
    arrays["bank"] = np.asfortranarray(arrays["bank"])
    return write_dir(tmp / "data", arrays)


NAN = float("nan")
BROKEN_DATASETS: list[tuple[str, Callable[[Path], Path], str]] = [
    # values (the first bad index is named, so each case breaks two places)
    (
        "length-zero",
        _broken_dir("ids", "lengths", _set((13,), 0, (40,))),
        "lengths.npy: lengths[13] = 0, but every length must be in 1..6 (T)",
    ),
    ("length-over-T", _broken_dir("ids", "lengths", _set((21,), T + 1)), "lengths[21] = 7"),
    (
        "positive-out-of-range",
        _broken_dir("ids", "positives", _set((4,), M, (30,))),
        "positives.npy: positives[4] = 40, but every positive must be a bank row in 0..39",
    ),
    ("positive-negative", _broken_dir("ids", "positives", _set((2,), -1)), "positives[2] = -1"),
    (
        "context-id-out-of-range",
        _broken_dir("ids", "context_ids", _set((7, 0), M, (9, 0))),
        "context_ids.npy: context_ids[7, 0] = 40",
    ),
    (
        "context-id-below-padding",
        _broken_dir("ids", "context_ids", _set((11, 0), -2)),
        "context_ids[11, 0] = -2",
    ),
    (
        "padding-inside-length",
        _broken_dir("ids", "context_ids", _set((T - 1, T - 1), -1)),  # lengths[5] = 6
        "context_ids.npy: context_ids[5, 5] = -1, but lengths[5] = 6: the first 6 ids",
    ),
    (
        "bank-nan",
        _broken_dir("ids", "bank", _set((6, 2), NAN, (8, 0))),
        "bank.npy: bank[6, 2] = nan, but vectors must be finite",
    ),
    ("bank-inf", _broken_dir("ids", "bank", _set((0, 5), float("inf"))), "bank[0, 5] = inf"),
    (
        "contexts-nan-inside-length",
        _broken_dir("contexts", "contexts", _set((3, 2, 1), NAN)),  # lengths[3] = 4
        "contexts.npy: contexts[3, 2, 1] = nan",
    ),
    # layout
    (
        "bank-float64",
        _broken_dir("ids", "bank", lambda a: a.astype(np.float64)),
        "bank.npy: bank has dtype float64, but bank must be float32",
    ),
    (
        "contexts-float64",
        _broken_dir("contexts", "contexts", lambda a: a.astype(np.float64)),
        "contexts.npy: contexts has dtype float64, but contexts must be float32",
    ),
    (
        "bank-1d",
        _broken_dir("ids", "bank", lambda a: a.ravel()),
        "bank.npy: bank has shape (320,), but bank must be (M, D)",
    ),
    (
        "bank-empty",
        _broken_dir("ids", "bank", lambda a: a[:0]),
        "bank.npy: bank has shape (0, 8): it is empty",
    ),
    ("bank-fortran-order", _bank_fortran, "bank.npy: bank is stored in Fortran order"),
    (
        "contexts-other-dim",
        _broken_dir("contexts", "contexts", lambda a: a[:, :, :4].copy()),
        "contexts.npy: contexts holds vectors of size 4, but the bank's are 8",
    ),
    (
        "lengths-other-rows",
        _broken_dir("ids", "lengths", lambda a: a[:-1]),
        "lengths.npy: lengths has 59 rows, but positives has 60",
    ),
    (
        "context-ids-other-rows",
        _broken_dir("ids", "context_ids", lambda a: a[:-2]),
        "context_ids.npy: context_ids has 58 rows, but positives has 60",
    ),
    (
        "positives-float",
        _broken_dir("ids", "positives", lambda a: a.astype(np.float32)),
        "positives.npy: positives has dtype float32, but positives must be integers",
    ),
    (
        "positives-objects",
        _broken_dir("ids", "positives", lambda a: a.astype(object)),
        "positives.npy: positives has dtype object, but positives must be integers",
    ),
    (
        "context-ids-float",
        _broken_dir("ids", "context_ids", lambda a: a.astype(np.float64)),
        "context_ids.npy: context_ids has dtype float64, but context_ids must be integers",
    ),
    (
        "lengths-2d",
        _broken_dir("ids", "lengths", lambda a: a[:, None]),
        "lengths.npy: lengths has shape (60, 1), but lengths must be (N,)",
    ),
    (
        "groups-other-rows",
        _groups(np.zeros(N - 1, dtype=np.int64)),
        "groups.npy: groups has 59 rows, but positives has 60",
    ),
    (
        "groups-float",
        _groups(np.zeros(N, dtype=np.float32)),
        "groups.npy: groups has dtype float32, but groups must be integers",
    ),
    # files
    ("truncated-npy", _truncated_bank, "bank.npy: bank is truncated"),
    (
        "not-npy",
        _file_replaced("lengths", b"1,2,3,4\n5,6,7,8\n"),
        "lengths.npy: lengths is not a .npy array",
    ),
    ("missing-positives", _without("positives"), "data: has no positives.npy"),
    ("missing-bank", _without("bank"), "data: has no bank.npy"),
    ("missing-contexts", _without("context_ids"), "data: has no context_ids.npy"),
    ("both-layouts", _both_layouts, "data: has both contexts and context_ids"),
    ("no-such-path", lambda tmp: tmp / "nowhere", "nowhere: no such file or directory"),
    ("not-a-dataset", _file_with(b"bank,positives\n", "data.csv"), "data.csv: is not a dataset"),
    # manifest.json
    ("manifest-not-json", _manifest("{bank: 1"), "manifest.json: cannot be used as a manifest"),
    ("manifest-not-object", _manifest("[1, 2]"), "manifest.json: cannot be used as a manifest"),
    ("manifest-unreadable", _manifest(), "manifest.json: cannot be used as a manifest"),
    (
        "manifest-future-version",
        _manifest(value={"format_version": 99}),
        "manifest.json: format_version = 99, but this twotower reads format 1",
    ),
    (
        "manifest-other-shape",
        _manifest(value={"format_version": 1, "shapes": {"bank": [41, 8]}}),
        "manifest.json: shapes.bank = [41, 8], but the dataset's bank is [40, 8]",
    ),
    # .npz
    (
        "npz-missing-key",
        _npz(compressed=False, drop="positives"),
        "data.npz: has no member 'positives' for positives",
    ),
    ("npz-not-zip", _file_with(b"not a zip at all" * 8, "data.npz"), "data.npz: is not a readable"),
    ("npz-cut-in-half", _cut_in_half, "data.npz: is not a readable .npz"),
    ("npz-stored-member-short", _npz_short_member(False), "data.npz: bank is truncated"),
    ("npz-compressed-member-short", _npz_short_member(True), "data.npz: bank is truncated"),
    (
        "npz-stored-bad-length",
        _npz(compressed=False, key="lengths", change=_set((3,), 0)),
        "data.npz: lengths[3] = 0",
    ),
    (
        "npz-compressed-bad-positive",
        _npz(compressed=True, key="positives", change=_set((8,), M)),
        "data.npz: positives[8] = 40",
    ),
    (
        "npz-float64-bank",
        _npz(compressed=True, key="bank", change=lambda a: a.astype(np.float64)),
        "data.npz: bank has dtype float64, but bank must be float32",
    ),
]

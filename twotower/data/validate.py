"""The checks a dataset passes before anything trains on it, each failing as one line.

`dataset_keys` picks the arrays a dataset uses, `check_layout` checks shapes
and dtypes from the .npy headers alone (nothing is mapped or written before
it passes), and `check_values` scans the values in chunks: ids and lengths
in range, no NaN or Inf. Every message names the file, the array, the first
bad index and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from twotower.data.chunks import row_ranges
from twotower.data.npy import Header, Source, data_error

KEYS = ("bank", "contexts", "context_ids", "lengths", "positives", "groups")
CONTEXT_KEYS = ("contexts", "context_ids")
REQUIRED_KEYS = ("bank", "lengths", "positives")
OPTIONAL_KEYS = ("groups",)  # the source (document, user, session) of each sample
CHECKS_VERSION = 1  # bump when check_values checks more, so cached results are redone

# key -> (dimensions, what they are, float32 vectors (True) or integers (False))
LAYOUT = {
    "bank": (2, "(M, D)", True),
    "contexts": (3, "(N, T, D)", True),
    "context_ids": (2, "(N, T)", False),
    "lengths": (1, "(N,)", False),
    "positives": (1, "(N,)", False),
    "groups": (1, "(N,)", False),
}
FIX = "fix the file or regenerate it"


def dataset_keys(present: set[str], label: str, missing: Callable[[str], str]) -> list[str]:
    """The keys a dataset with arrays `present` uses: the required ones, one context key and
    the optional ones present.

    missing(key) says how to add a missing array; raises DataError when one is
    missing or when both context layouts are there.
    """
    contexts = [key for key in CONTEXT_KEYS if key in present]
    if len(contexts) == 2:
        raise data_error(
            label,
            "has both contexts and context_ids; keep one (contexts: vectors (N, T, D), "
            "context_ids: bank rows (N, T))",
        )
    for key in REQUIRED_KEYS:
        if key not in present:
            raise data_error(label, missing(key))
    if not contexts:
        raise data_error(label, missing("context_ids"))
    return [*REQUIRED_KEYS, contexts[0], *(key for key in OPTIONAL_KEYS if key in present)]


def check_layout(sources: Mapping[str, Source], headers: Mapping[str, Header]) -> None:
    """Shapes and dtypes of every array, and that they agree; raises DataError."""
    for key, header in headers.items():
        _check_one_layout(key, sources[key], header)
    bank = headers["bank"]
    context_key = "contexts" if "contexts" in headers else "context_ids"
    num_samples = headers["positives"].shape[0]
    for key in ("lengths", context_key, *(key for key in OPTIONAL_KEYS if key in headers)):
        rows = headers[key].shape[0]
        if rows != num_samples:
            raise data_error(
                sources[key].label,
                f"{sources[key].name} has {rows} rows, but positives has {num_samples} "
                f"(one per sample); {FIX}",
            )
    if context_key == "contexts" and headers["contexts"].shape[2] != bank.shape[1]:
        raise data_error(
            sources["contexts"].label,
            f"{sources['contexts'].name} holds vectors of size {headers['contexts'].shape[2]}, "
            f"but the bank's are {bank.shape[1]}; {FIX}",
        )


def _check_one_layout(key: str, source: Source, header: Header) -> None:
    ndim, dims, is_float = LAYOUT[key]
    where, dtype = source.name, header.dtype
    if is_float and dtype != np.float32:
        raise data_error(
            source.label,
            f"{where} has dtype {dtype}, but {key} must be float32; convert it "
            "(arr.astype(np.float32)) and save it again (twotower maps it as is, never copies it)",
        )
    if not is_float and (dtype.kind not in "iu" or dtype.hasobject):
        raise data_error(
            source.label,
            f"{where} has dtype {dtype}, but {key} must be integers (int64 or int32); "
            "save it as int64",
        )
    if len(header.shape) != ndim:
        raise data_error(
            source.label, f"{where} has shape {header.shape}, but {key} must be {dims}; {FIX}"
        )
    if 0 in header.shape:
        raise data_error(source.label, f"{where} has shape {header.shape}: it is empty; {FIX}")
    if header.fortran_order and ndim > 1:
        raise data_error(
            source.label,
            f"{where} is stored in Fortran order, so its rows are scattered on disk; "
            "save np.ascontiguousarray(arr) instead",
        )


def check_values(arrays: Mapping[str, np.ndarray], sources: Mapping[str, Source]) -> None:
    """Scan every array in chunks; raise DataError at the first bad value.

    1 <= length <= T; 0 <= positive < M; -1 <= context id < M with no -1 before
    the sequence's length; the bank, and contexts up to each length, finite.
    """
    bank = arrays["bank"]
    num_rows = bank.shape[0]
    lengths = arrays["lengths"]
    seq_len = arrays["contexts" if "contexts" in arrays else "context_ids"].shape[1]
    _check_range(
        lengths, sources["lengths"], 1, seq_len, f"every length must be in 1..{seq_len} (T)"
    )
    _check_range(
        arrays["positives"],
        sources["positives"],
        0,
        num_rows - 1,
        f"every positive must be a bank row in 0..{num_rows - 1}",
    )
    if "context_ids" in arrays:
        _check_context_ids(arrays["context_ids"], lengths, num_rows, sources["context_ids"])
    _check_finite(bank, None, sources["bank"])
    if "contexts" in arrays:
        _check_finite(arrays["contexts"], lengths, sources["contexts"])


def _row_chunks(array: np.ndarray, source: Source) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) chunks of `array`, read from the map one chunk at a time."""
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
    for start, stop in row_ranges(array.shape[0], row_bytes, f"checking {source.name}"):
        yield start, np.asarray(array[start:stop])


def within_lengths(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """(B, T) bool for lengths (B,): True where step t lies inside sequence b (t < lengths[b])."""
    return np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]


def _raise_at_first(
    source: Source, start: int, chunk: np.ndarray, bad: np.ndarray, rule: str
) -> None:
    """If any of `bad` (chunk's shape, or its leading dims) is True, raise DataError naming the
    first such element of the array (chunk holds rows start, start + 1, ...) and `rule`."""
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        index = ", ".join(str(i) for i in (start + position[0], *position[1:]))
        raise data_error(
            source.label, f"{source.name}[{index}] = {chunk[position]}, but {rule}; {FIX}"
        )


def _check_range(array: np.ndarray, source: Source, low: int, high: int, rule: str) -> None:
    for start, chunk in _row_chunks(array, source):
        _raise_at_first(source, start, chunk, (chunk < low) | (chunk > high), rule)


def _check_context_ids(ids: np.ndarray, lengths: np.ndarray, num_rows: int, source: Source) -> None:
    rule = f"context ids must be bank rows in 0..{num_rows - 1}, or -1 for padding"
    for start, chunk in _row_chunks(ids, source):
        _raise_at_first(source, start, chunk, (chunk < -1) | (chunk >= num_rows), rule)
        early_padding = (chunk == -1) & within_lengths(
            lengths[start : start + len(chunk)], ids.shape[1]
        )
        if early_padding.any():
            row = start + int(np.argwhere(early_padding)[0][0])
            rule = (
                f"lengths[{row}] = {lengths[row]}: the first {lengths[row]} ids of a sequence "
                "must be bank rows, not padding"
            )
            _raise_at_first(source, start, chunk, early_padding, rule)


def _check_finite(array: np.ndarray, lengths: np.ndarray | None, source: Source) -> None:
    """All of `array` finite or, with lengths, every contexts[i, :lengths[i]]."""
    for start, chunk in _row_chunks(array, source):
        bad = ~np.isfinite(chunk)
        if lengths is not None:
            bad &= within_lengths(lengths[start : start + len(chunk)], chunk.shape[1])[:, :, None]
        _raise_at_first(source, start, chunk, bad, "vectors must be finite")

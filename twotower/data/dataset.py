"""The `Dataset` of memory maps, and opening one from a directory of .npy files or a .npz.

`load_dataset` reads the .npy headers, checks the layout, maps every array (a
stored .npz member in place; a compressed one after streaming it once into a
cache directory), then scans the values unless the manifest records that
these exact files passed before. `convert` does the same into a directory the
user names.
"""

from __future__ import annotations

import copy
import hashlib
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from twotower.data.chunks import row_ranges
from twotower.data.manifest import (
    MANIFEST,
    check_shapes,
    describe,
    file_stamp,
    read_manifest,
    save_manifest,
    settled,
)
from twotower.data.npy import (
    Header,
    Source,
    data_error,
    extract,
    file_source,
    map_array,
    npz_sources,
    read_header,
    relocated,
)
from twotower.data.validate import (
    CHECKS_VERSION,
    KEYS,
    check_layout,
    check_values,
    dataset_keys,
    within_lengths,
)
from twotower.errors import UsageError

CACHE_SUFFIX = ".twotower"  # FILE.npz is unpacked into FILE.npz.twotower/ beside it


@dataclass(eq=False, repr=False)
class Dataset:
    """An opened dataset: read-only memory maps, nothing read whole.

    path: the directory or .npz it came from. bank (M, D) float32;
    contexts (N, T, D) float32 or None; context_ids (N, T) integer bank rows,
    -1 padded, or None (exactly one of the two is set); lengths (N,) and
    positives (N,) integer (int64, or the integer type stored).
    manifest: the manifest.json contents (plus what this load learned);
    manifest_path: where it is saved (None: kept in memory only);
    sources: where each array's bytes live (cache entries key on those files).
    """

    path: Path
    bank: np.ndarray
    contexts: np.ndarray | None
    context_ids: np.ndarray | None
    lengths: np.ndarray
    positives: np.ndarray
    manifest: dict[str, Any]
    manifest_path: Path | None = None
    sources: dict[str, Source] = field(default_factory=dict)
    groups: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"Dataset({str(self.path)!r}, layout={self.layout}, N={self.num_samples}, "
            f"T={self.seq_len}, D={self.dim}, M={self.bank_size})"
        )

    def describe(self) -> str:
        """The dataset in a sentence's words: '3,000 samples of up to 20 context items (layout
        ids: bank rows), a bank of 1,000 x 64 vectors, 1.3 MiB on disk'."""
        items = "bank rows" if self.layout == "ids" else "vectors"
        size = self.disk_bytes
        on_disk = f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"
        return (
            f"{self.num_samples:,} samples of up to {self.seq_len} context items (layout "
            f"{self.layout}: {items}), a bank of {self.bank_size:,} x {self.dim} vectors, "
            f"{on_disk} on disk"
        )

    @property
    def disk_bytes(self) -> int:
        """The size of its files: the .npz, or every file of the directory."""
        if not self.path.is_dir():
            return self.path.stat().st_size
        return sum(file.stat().st_size for file in self.path.iterdir() if file.is_file())

    @property
    def num_samples(self) -> int:
        """N, the number of (context sequence, positive) samples."""
        return int(self.positives.shape[0])

    @property
    def seq_len(self) -> int:
        """T, the longest sequence (the padded width of contexts / context_ids)."""
        sequences = self.contexts if self.contexts is not None else self.context_ids
        assert sequences is not None
        return int(sequences.shape[1])

    @property
    def dim(self) -> int:
        """D, the size of every vector."""
        return int(self.bank.shape[1])

    @property
    def bank_size(self) -> int:
        """M, the number of bank rows."""
        return int(self.bank.shape[0])

    @property
    def layout(self) -> str:
        """The layout: ids (context_ids into the bank) or contexts (the vectors themselves)."""
        return "ids" if self.context_ids is not None else "contexts"

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read samples `rows` (B,) only.

        Returns contexts (B, T, D) float32 C-contiguous (for context_ids: the
        bank rows), zero vectors past each length; lengths (B,) int64;
        positive_ids (B,) int64.
        """
        rows = np.asarray(rows)
        lengths = np.asarray(self.lengths[rows], dtype=np.int64)
        positives = np.asarray(self.positives[rows], dtype=np.int64)
        if self.context_ids is not None:
            ids = np.asarray(self.context_ids[rows], dtype=np.int64)
            return sequences_from_ids(self.bank, ids, lengths), lengths, positives
        assert self.contexts is not None
        contexts = np.ascontiguousarray(self.contexts[rows], dtype=np.float32)  # a copy
        # validation allows anything past a length (even NaN); no engine should see it
        contexts[~within_lengths(lengths, contexts.shape[1])] = 0.0
        return contexts, lengths, positives

    def seen_ids(self, rows: np.ndarray) -> np.ndarray:
        """The bank ids of samples `rows`' context items (B, T) int64, -1 past each length.

        Raises UsageError for a dataset of context vectors (no context_ids.npy).
        """
        if self.context_ids is None:
            raise UsageError(
                f"{self.path}: --exclude-context needs the bank ids of the context items "
                "(context_ids.npy); this dataset holds context vectors only"
            )
        rows = np.asarray(rows)
        ids = np.array(self.context_ids[rows], dtype=np.int64)
        lengths = np.asarray(self.lengths[rows], dtype=np.int64)
        ids[~within_lengths(lengths, ids.shape[1])] = -1
        return ids

    @cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of the bank: of b"twotower-bank <dtype> <M>x<D>\\n", then its rows' bytes.

        Hashed in chunks (with a progress bar on big banks) and cached in the
        manifest under the bank file's [size, mtime_ns], so a changed bank
        changes it. It keys the on-disk index caches.
        """
        source = self.sources.get("bank")
        stamp = file_stamp(source.path) if source is not None else None
        cached = self.manifest.get("fingerprint")
        if stamp is not None and isinstance(cached, dict) and cached.get("stamp") == stamp:
            return str(cached["sha256"])
        digest = bank_digest(self.bank)
        if source is not None and stamp is not None and (source.ours or settled(stamp)):
            self.manifest["fingerprint"] = {"stamp": stamp, "sha256": digest}
            self.save_manifest()
        return digest

    def save_manifest(self) -> bool:
        """Write the manifest where it belongs; False if that is impossible (kept in memory)."""
        return self.manifest_path is not None and save_manifest(self.manifest_path, self.manifest)


def sequences_from_ids(bank: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Context vectors (B, T, D) float32, C-contiguous, for ids (B, T) into bank (M, D):
    the bank rows, and zero vectors past each of lengths (B,) (so -1 padding reads as zeros)."""
    contexts = np.asarray(bank[np.maximum(ids, 0)])  # a fresh copy of the rows
    contexts[~within_lengths(lengths, ids.shape[1])] = 0.0
    return contexts


def bank_digest(bank: np.ndarray) -> str:
    """The sha256 hex digest `Dataset.fingerprint` describes, for a (M, D) array."""
    rows, dim = bank.shape
    digest = hashlib.sha256(f"twotower-bank {bank.dtype.str} {rows}x{dim}\n".encode())
    for start, stop in row_ranges(rows, dim * bank.dtype.itemsize, "fingerprinting the bank"):
        digest.update(np.ascontiguousarray(bank[start:stop]).data)
    return digest.hexdigest()


def load_dataset(path: str | os.PathLike[str], validate: bool = True) -> Dataset:
    """Open a dataset directory (bank.npy, context_ids.npy or contexts.npy, lengths.npy,
    positives.npy, manifest.json) or a .npz with the same keys, memory-mapped.

    validate: scan the values too (skipped when the manifest records that these
    exact files passed). Raises twotower.errors.DataError, one line, on any problem.
    """
    path = Path(path)
    if path.is_dir():
        return open_directory(path, validate)
    if path.is_file() and (path.suffix.lower() == ".npz" or zipfile.is_zipfile(path)):
        return _load_npz(path, validate)
    if path.exists():
        raise data_error(
            str(path), "is not a dataset: give a directory of .npy files or a .npz file"
        )
    raise data_error(
        str(path), "no such file or directory; make a dataset with `twotower synth --out DIR`"
    )


def open_directory(path: Path, validate: bool = True, ours: bool = False) -> Dataset:
    """`load_dataset` of a directory; ours: twotower just wrote its files (trust their stamps)."""
    present = {key for key in KEYS if (path / f"{key}.npy").is_file()}
    keys = dataset_keys(
        present,
        str(path),
        lambda key: (
            f"has no {key}.npy; a dataset directory needs bank.npy, lengths.npy, "
            "positives.npy and context_ids.npy or contexts.npy (see `twotower synth`)"
        ),
    )
    sources = {key: file_source(path / f"{key}.npy", key, ours) for key in keys}
    headers = {key: read_header(source) for key, source in sources.items()}
    check_layout(sources, headers)
    manifest_path = path / MANIFEST
    manifest = read_manifest(manifest_path)
    return _open(path, sources, headers, manifest, manifest_path, validate)


def _missing_member(
    npz: Path, members: Mapping[str, Source], names: Mapping[str, str]
) -> Callable[[str], str]:
    """The missing() of `dataset_keys` for a .npz whose member for key k is names[k]."""

    def missing(key: str) -> str:
        return (
            f"has no member {names[key]!r} for {key} (it has {', '.join(sorted(members)) or 'none'}"
            "; a dataset needs bank, lengths, positives and context_ids or contexts); rename it "
            f"or run `twotower convert {npz} --out DIR --key {key}=NAME`"
        )

    return missing


def _npz_keys(npz: Path, names: Mapping[str, str]) -> tuple[dict[str, Source], dict[str, Header]]:
    """The sources (member names[key] for each key) and headers of a .npz, layout checked."""
    members = npz_sources(npz)
    present = {key for key in KEYS if names[key] in members}
    keys = dataset_keys(present, str(npz), _missing_member(npz, members, names))
    sources = {key: members[names[key]] for key in keys}
    headers = {key: read_header(source) for key, source in sources.items()}
    check_layout(sources, headers)
    return sources, headers


def npz_cache_dirs(npz: Path) -> list[Path]:
    """Where a .npz is unpacked, in order of preference: beside it, else the user cache dir."""
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    tag = hashlib.sha256(str(npz.resolve()).encode()).hexdigest()[:16]
    return [
        npz.with_name(npz.name + CACHE_SUFFIX),
        Path(home) / "twotower" / "npz" / f"{npz.name}-{tag}",
    ]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        return False
    return True


def _load_npz(npz: Path, validate: bool) -> Dataset:
    sources, headers = _npz_keys(npz, {key: key for key in KEYS})
    compressed = [key for key, source in sources.items() if source.compressed]
    stamp = file_stamp(npz)
    origin = {"path": str(npz.resolve()), "stamp": stamp if settled(stamp) else None}
    for cache in npz_cache_dirs(npz):
        manifest = read_manifest(cache / MANIFEST, strict=False)
        if (
            origin["stamp"] is not None
            and manifest.get("source") == origin
            and all((cache / f"{key}.npy").is_file() for key in compressed)
        ):
            for key in compressed:
                sources[key] = relocated(sources[key], cache / f"{key}.npy")
            return _open(npz, sources, headers, manifest, cache / MANIFEST, validate)
    writable = next((cache for cache in npz_cache_dirs(npz) if _writable(cache)), None)
    if writable is None and compressed:
        raise data_error(
            str(npz),
            f"{compressed[0]} is compressed and must be unpacked, but neither "
            f"{' nor '.join(map(str, npz_cache_dirs(npz)))} is writable; run "
            f"`twotower convert {npz} --out DIR` into a writable directory",
        )
    for key in compressed:
        assert writable is not None
        sources[key] = extract(sources[key], writable / f"{key}.npy")
    manifest_path = writable / MANIFEST if writable is not None else None
    return _open(npz, sources, headers, {"source": origin}, manifest_path, validate)


def _open(
    path: Path,
    sources: Mapping[str, Source],
    headers: Mapping[str, Header],
    manifest: dict[str, Any],
    manifest_path: Path | None,
    validate: bool,
) -> Dataset:
    """Map the (layout-checked) arrays, check values unless cached, and save what was learned."""
    check_shapes(manifest, headers, str(manifest_path or path))
    arrays = {key: map_array(sources[key], headers[key]) for key in sources}
    before = copy.deepcopy(manifest)
    stamps = {key: file_stamp(source.path) for key, source in sources.items()}
    checked = {"version": CHECKS_VERSION, "stamps": stamps}
    if validate and manifest.get("checked") != checked:
        trusted = all(sources[key].ours or settled(stamp) for key, stamp in stamps.items())
        check_values(arrays, sources)
        manifest.pop("checked", None)
        if trusted:
            manifest["checked"] = checked
    describe(manifest, headers)
    dataset = Dataset(
        path=path,
        bank=arrays["bank"],
        contexts=arrays.get("contexts"),
        context_ids=arrays.get("context_ids"),
        lengths=arrays["lengths"],
        positives=arrays["positives"],
        manifest=manifest,
        manifest_path=manifest_path,
        sources=dict(sources),
        groups=arrays.get("groups"),
    )
    if manifest != before:
        dataset.save_manifest()
    return dataset


def convert(
    npz_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    key_map: Mapping[str, str] | None = None,
) -> Dataset:
    """Stream a .npz into a dataset directory `out_dir` and open it (validated).

    key_map: dataset key -> member name, for members named otherwise
    ({"bank": "emb", "positives": "pos"}). Nothing is written before the
    layout checks pass; if the value checks fail, what was written is removed.
    Raises DataError for a bad file, UsageError for a bad key map or a non-empty out_dir.
    """
    npz, out = Path(npz_path), Path(out_dir)
    unknown = sorted(set(key_map or {}) - set(KEYS))
    if unknown:
        raise UsageError(f"unknown dataset key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    names = {key: (key_map or {}).get(key, key) for key in KEYS}
    if not npz.is_file():
        raise data_error(str(npz), "no such file; give the .npz to convert")
    sources, headers = _npz_keys(npz, names)
    taken = [name for name in (*(f"{key}.npy" for key in KEYS), MANIFEST) if (out / name).exists()]
    if taken:
        raise UsageError(f"{out}: already holds {taken[0]}; convert into an empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the directory ({exc.strerror})") from exc
    written: list[Path] = []
    try:
        for key in sources:
            sources[key] = extract(sources[key], out / f"{key}.npy")
            written.append(out / f"{key}.npy")
        made_by = {"how": "twotower convert", "source": str(npz.resolve()), "members": names}
        return _open(out, sources, headers, {"made_by": made_by}, out / MANIFEST, True)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def parse_key_map(text: str) -> dict[str, str]:
    """'bank=emb,positives=pos' -> {"bank": "emb", "positives": "pos"} (the CLI's --key)."""
    key_map = {}
    for part in filter(None, (part.strip() for part in text.split(","))):
        key, eq, name = (side.strip() for side in part.partition("="))
        if not (eq and name) or key not in KEYS:
            raise UsageError(f"--key {part!r}: expected KEY=NAME with KEY one of {', '.join(KEYS)}")
        key_map[key] = name
    return key_map

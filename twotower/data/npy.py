"""Where each array's bytes live and how to map them: .npy files and members of a .npz.

`np.load(mmap_mode=)` cannot map a member of a .npz (it reads the whole member
on every access). Here a stored (uncompressed) member is memory-mapped in place,
at the offset of its .npy bytes inside the zip, found from the zip's local file
header; a compressed member is streamed once, in chunks, into a plain .npy file
(`extract`) and mapped from there. The .npy header is parsed here too, so a
truncated file, or one that is not .npy at all, is a one-line `DataError`.

Known limitation: a zip places a member's data at whatever offset its names
leave, so arrays mapped from a stored .npz are usually not 4-byte aligned;
NumPy handles them without copying, but GEMMs over them run slower than over
a converted directory (np.save pads its headers to 64 bytes).
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from twotower.atomic import replacing
from twotower.data.chunks import CHUNK_BYTES, progress
from twotower.errors import DataError

NPY_SUFFIX = ".npy"
ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")  # PKZIP local file header, 30 bytes
ZIP_LOCAL_MAGIC = b"PK\x03\x04"


def data_error(label: str, text: str) -> DataError:
    """A DataError whose one-line message starts with the file it is about."""
    return DataError(" ".join(f"{label}: {text}".split("\n")))


@dataclass(frozen=True)
class Source:
    """Where one array's .npy bytes live.

    label: the file named in messages (the .npy file, or the user's .npz);
    name: the array's name in that file; path: the file that holds the bytes;
    offset: where the .npy bytes start in `path`; size: how many bytes are
    there for them; member: the zip member's name when the bytes are
    compressed inside `path` (they must be `extract`ed before mapping);
    ours: `path` was written by twotower (unpacked, converted, synthesized),
    so no one rewrites it behind our back and its stamp is trusted at once.
    """

    label: str
    name: str
    path: Path
    offset: int
    size: int
    member: str | None = None
    ours: bool = False

    @property
    def compressed(self) -> bool:
        return self.member is not None


@dataclass(frozen=True)
class Header:
    """A parsed .npy header. data_offset: where the data starts, counted from Source.offset."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def file_source(path: Path, name: str, ours: bool = False) -> Source:
    """The Source of a plain .npy file (its label is its own path)."""
    size = path.stat().st_size
    return Source(label=str(path), name=name, path=path, offset=0, size=size, ours=ours)


def npz_sources(npz: Path) -> dict[str, Source]:
    """Array name -> Source for each `NAME.npy` member of a .npz; reads the zip directory only."""
    label = str(npz)
    try:
        with zipfile.ZipFile(npz) as archive:
            infos = [info for info in archive.infolist() if info.filename.endswith(NPY_SUFFIX)]
    except (zipfile.BadZipFile, OSError) as exc:
        raise data_error(
            label, f"is not a readable .npz (zip) file ({exc}); copy it again or re-create it"
        ) from exc
    sources = {}
    with open(npz, "rb") as stream:
        for info in infos:
            name = info.filename[: -len(NPY_SUFFIX)]
            if info.flag_bits & 0x1:
                raise data_error(label, f"{name} is encrypted; store it without a password")
            offset = _member_data_offset(stream, info.header_offset, label, name)
            stored = info.compress_type == zipfile.ZIP_STORED
            sources[name] = Source(
                label=label,
                name=name,
                path=npz,
                offset=offset,
                size=info.file_size,
                member=None if stored else info.filename,
            )
    return sources


def _member_data_offset(stream: BinaryIO, header_offset: int, label: str, name: str) -> int:
    """Where a zip member's bytes start: after its local header, file name and extra field."""
    stream.seek(header_offset)
    raw = stream.read(ZIP_LOCAL_HEADER.size)
    if len(raw) < ZIP_LOCAL_HEADER.size or raw[:4] != ZIP_LOCAL_MAGIC:
        raise data_error(label, f"the zip entry of {name} is damaged; copy the file again")
    fields = ZIP_LOCAL_HEADER.unpack(raw)
    name_length, extra_length = fields[-2], fields[-1]
    return header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length


@contextmanager
def _open_bytes(source: Source) -> Iterator[BinaryIO]:
    """A stream positioned at the first .npy byte of `source` (decompressing if need be)."""
    try:
        if source.member is None:
            with open(source.path, "rb") as stream:
                stream.seek(source.offset)
                yield stream
        else:
            with zipfile.ZipFile(source.path) as archive, archive.open(source.member) as stream:
                yield stream  # type: ignore[misc]  # ZipExtFile is a binary stream
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise data_error(
            source.label, f"{source.name} is damaged ({exc}); copy the file again or re-create it"
        ) from exc


def read_header(source: Source) -> Header:
    """Parse the .npy header of `source` (reads a few hundred bytes)."""
    with _open_bytes(source) as stream:
        try:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f".npy format version {version} is not supported")
        except ValueError as exc:
            raise data_error(
                source.label,
                f"{source.name} is not a .npy array ({exc}); save it with np.save "
                "or regenerate the dataset",
            ) from exc
        data_offset = stream.tell() - (source.offset if source.member is None else 0)
    return Header(tuple(shape), dtype, fortran_order, data_offset)


def map_array(source: Source, header: Header) -> np.memmap:
    """A read-only memory map of the array, after checking that all its bytes are there."""
    if source.compressed:
        raise ValueError(f"{source.label}:{source.name} is compressed; extract it first")
    available = min(source.size, source.path.stat().st_size - source.offset) - header.data_offset
    if available < header.nbytes:
        raise data_error(
            source.label,
            f"{source.name} is truncated: its header says {header.shape} {header.dtype} "
            f"({header.nbytes} bytes) but only {max(available, 0)} bytes are there; "
            "copy the file again or regenerate it",
        )
    return np.memmap(
        source.path,
        dtype=header.dtype,
        mode="r",
        offset=source.offset + header.data_offset,
        shape=header.shape,
        order="F" if header.fortran_order else "C",
    )


def extract(source: Source, dest: Path) -> Source:
    """Stream the .npy bytes of `source` into the file `dest`, in chunks, with a progress bar.

    Written under a temporary name and renamed, so `dest` is complete or absent.
    Returns the Source of `dest`, still labelled as the original for messages.
    """
    with replacing(dest) as partial, _open_bytes(source) as stream, open(partial, "wb") as out:
        remaining = source.size
        with progress(source.size, f"unpacking {source.label}:{source.name}") as bar:
            while remaining > 0:
                chunk = stream.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)
                bar.update(len(chunk))
    return relocated(source, dest)


def relocated(source: Source, path: Path) -> Source:
    """`source` as read from `path`, the .npy file twotower unpacked it into (same label, name)."""
    return replace(source, path=path, offset=0, size=path.stat().st_size, member=None, ours=True)

"""manifest.json: what a dataset is, how it was made, and caches of its slow checks.

    {"format_version": 1, "layout": "ids" | "contexts",
     "shapes": {"bank": [M, D], "context_ids": [N, T], ...},
     "made_by": {...},                                  # how it was made, when known
     "checked": {"version": 1, "stamps": {key: [size, mtime_ns]}},
     "fingerprint": {"stamp": [size, mtime_ns], "sha256": "..."}}

A cache entry holds only while the stamp (size, mtime_ns) of each file it
was computed from is unchanged. Filesystem clocks are coarse (a few ms on
ext4, 2 s on FAT), so a file rewritten at the same size within one tick keeps
its stamp: a stamp is cached only once its mtime is older than RACY_NS (as git
does with "racily clean" files), and a dataset written a moment ago is
simply checked again on its next load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twotower.atomic import replace_file
from twotower.data.npy import Header, data_error

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RACY_NS = 2_000_000_000  # a file modified more recently than this may change without a new mtime
Stamp = list[int]  # [size, mtime_ns]


def file_stamp(path: Path) -> Stamp:
    """[size, mtime_ns] of a file: what cache entries are keyed by."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def settled(stamp: Stamp) -> bool:
    """Whether any later change to the file must change this stamp (see the module docstring)."""
    return time.time_ns() - stamp[1] > RACY_NS


def read_manifest(path: Path, strict: bool = True) -> dict[str, Any]:
    """The manifest at `path`, or {} when there is none.

    strict: a manifest that cannot be read or is invalid raises DataError
    (a user's dataset); otherwise it counts as absent (twotower's own caches).
    """
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"it holds a JSON {type(manifest).__name__}, not an object")
    except (OSError, ValueError) as exc:
        if not strict:
            return {}
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise data_error(
            str(path),
            f"cannot be used as a manifest ({reason}); fix it or delete it (twotower rewrites it)",
        ) from exc
    version = manifest.get("format_version", FORMAT_VERSION)
    if strict and not (isinstance(version, int) and 1 <= version <= FORMAT_VERSION):
        raise data_error(
            str(path),
            f"format_version = {version!r}, but this twotower reads format {FORMAT_VERSION}; "
            "upgrade twotower or regenerate the dataset",
        )
    return manifest


def check_shapes(manifest: Mapping[str, Any], headers: Mapping[str, Header], label: str) -> None:
    """Raise DataError if the manifest's `shapes` disagree with the arrays' headers."""
    shapes = manifest.get("shapes", {})
    if not isinstance(shapes, dict):
        raise data_error(label, "shapes must be an object; fix it or delete the manifest")
    for key, shape in shapes.items():
        actual = list(headers[key].shape) if key in headers else None
        if shape != actual:
            raise data_error(
                label,
                f"shapes.{key} = {shape}, but the dataset's {key} is "
                f"{'absent' if actual is None else actual}: the files changed after the "
                "manifest was written; regenerate the dataset or delete the manifest",
            )


def describe(manifest: dict[str, Any], headers: Mapping[str, Header]) -> None:
    """Fill in format_version, layout and shapes from the headers (what the format promises)."""
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest["layout"] = "contexts" if "contexts" in headers else "ids"
    manifest["shapes"] = {key: list(header.shape) for key, header in headers.items()}


def save_manifest(path: Path, manifest: Mapping[str, Any]) -> bool:
    """Write the manifest atomically; False (and nothing raised) if it cannot be written."""
    try:
        replace_file(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    except OSError:
        return False
    return True

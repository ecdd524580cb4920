"""Atomic, checksummed, backend-neutral checkpoints under `RUN/checkpoints/`.

A checkpoint is a directory `step-NNNNNNN/` holding one `.npy` per array and a
`meta.json` with `format_version`, `step`, the caller's meta and, per array,
the sha256 of its `.npy` bytes, its shape and dtype. It is written under a
temporary name, fsynced, renamed into place (the commit), and only then named
by `checkpoints/LATEST` and followed by pruning. Loading verifies every
checksum and falls back, with a warning, to the newest earlier checkpoint that
passes. One writer per run directory is assumed: a save removes every
temporary leftover it finds, whoever left it.

`RUN/best/` (the parameters of the evaluation with the best held-out metric) is a
store of the same kind holding one checkpoint: `best/step-NNNNNNN/` and `best/LATEST`,
written by the same code, so a crash while a new best is written leaves the previous
one loadable. `load_checkpoint(run, which="best")` reads it. `choose_checkpoint` parses
every command's `--checkpoint best|latest|step-N` (default: best/ where the run kept one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from twotower import progress
from twotower.atomic import TEMPORARY_GLOB, fsync_dir, naming, replace_dir, replace_file
from twotower.errors import TwotowerError, UsageError
from twotower.paths import shown_path
from twotower.process.phase import Phase
from twotower.run.records import (
    CHECKPOINT_FORMAT,
    READABLE_CHECKPOINT_FORMATS,
    CheckpointMeta,
)

FORMAT_VERSION = CHECKPOINT_FORMAT  # meta.json's, kept in twotower.run.records
READABLE_VERSIONS = READABLE_CHECKPOINT_FORMATS
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
STORES = {"latest": CHECKPOINTS_DIR, "best": BEST_DIR}  # --checkpoint's words for a store
CHOICES = "best, latest or step-N"  # every --checkpoint (choose_checkpoint)
LATEST = "LATEST"
META = "meta.json"
TMP_PREFIX = ".tmp-"
RESERVED_META = ("format_version", "step", "arrays")
_STEP_DIR = re.compile(r"step-(\d{7,})")
_CHOICE_STEP = re.compile(r"step-(\d+)")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_HASH_CHUNK = 1 << 20
_T = TypeVar("_T")


class CheckpointError(TwotowerError):
    """No checkpoint that passes verification where one was asked for; the message is one line."""


def step_dir_name(step: int) -> str:
    """The directory name of a step's checkpoint: 7 -> 'step-0000007'."""
    return f"step-{step:07d}"


# --- writing ----------------------------------------------------------------------


class _HashingWriter:
    """A write-only file wrapper that hashes every byte on its way to disk."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)


def _write_durably(path: Path, write: Callable[[BinaryIO], _T]) -> _T:
    """Create `path`, let `write` fill it, flush and fsync it; return what `write` returned."""
    with naming(path), open(path, "xb") as file:
        result = write(file)
        file.flush()
        os.fsync(file.fileno())
    return result


def _write_array(path: Path, array: np.ndarray) -> str:
    """Write `array` as .npy, fsynced; return the sha256 of the file's bytes."""

    def write(file: BinaryIO) -> str:
        writer = _HashingWriter(file)
        np.lib.format.write_array(writer, array, allow_pickle=False)  # type: ignore[arg-type]
        return writer.sha256.hexdigest()

    return _write_durably(path, write)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"checkpoint meta value {value!r} ({type(value).__name__}) is not JSON")


def _check_inputs(step: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    reserved = [key for key in RESERVED_META if key in meta]
    if reserved:
        raise ValueError(f"checkpoint meta may not set {', '.join(reserved)}; save_checkpoint does")
    bad = [name for name in arrays if not _ARRAY_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"array names must be file-name safe (letters, digits, _ . -): {bad}")
    if len({name.lower() for name in arrays}) != len(arrays):
        raise ValueError("array names must differ in more than case (macOS file systems fold it)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _set_latest(ckpt_dir: Path, name: str) -> None:
    """Replace `LATEST` atomically with `name`: write a temp file, fsync, rename, fsync dir."""
    replace_file(ckpt_dir / LATEST, name, durable=True)


def _retire(ckpt_dir: Path, path: Path) -> Path:
    """Rename a committed checkpoint to a temporary name, so it stops counting before deletion."""
    retired = ckpt_dir / f"{TMP_PREFIX}retired-{path.name}-{os.getpid()}"
    _remove(retired)
    os.rename(path, retired)
    return retired


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    keep: int,
    before_commit: Callable[[], None] | None = None,
    store: str = CHECKPOINTS_DIR,
) -> Path:
    """Commit `arrays` as `run_dir/checkpoints/step-NNNNNNN/` (`store`: another folder of
    the run, e.g. BEST_DIR); return that directory.

    `arrays` maps file-name-safe names (dots allowed) to arrays of any shape
    and any dtype but object, 0-d included. `meta` (JSON values: epoch,
    backend, miner, config_hash, ...) goes into meta.json beside
    `format_version`, `step` and each array's sha256, shape and dtype.
    `before_commit` runs once everything is written and fsynced, before the
    rename that commits it (the `checkpoint` fault point); if it raises, the
    temporary directory is removed. After the commit LATEST names the new
    checkpoint, and only the `keep` newest steps up to this one survive; any
    with a higher step (left by a run resumed from an earlier checkpoint) go
    too. Saving a step that exists replaces it (`atomic.replace_dir`): the old one is
    swapped out only once the new one is complete.
    Writing the arrays is the "checkpoint" progress task (`twotower.progress`).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _check_inputs(step, arrays, meta)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / store
    if not ckpt_dir.is_dir():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(run_dir)
    for leftover in [*ckpt_dir.glob(f"{TMP_PREFIX}*"), *ckpt_dir.glob(TEMPORARY_GLOB)]:
        _remove(leftover)

    name = step_dir_name(step)
    tmp = ckpt_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    size = sum(np.asarray(value).nbytes for value in arrays.values())
    try:
        entries = {}
        what = f"step {step}: {len(arrays)} arrays, {size / 2**20:,.1f} MiB"
        with progress.task(Phase.CHECKPOINT, what, size, "bytes") as task:
            for array_name, value in arrays.items():
                array = np.asarray(value)
                sha256 = _write_array(tmp / f"{array_name}.npy", array)
                entries[array_name] = {
                    "sha256": sha256,
                    "shape": list(array.shape),
                    "dtype": array.dtype.str,
                }
                task.advance(array.nbytes)
        document = {"format_version": FORMAT_VERSION, "step": step, **meta, "arrays": entries}
        text = json.dumps(document, indent=2, default=_json_default)
        _write_durably(tmp / META, lambda file: file.write(text.encode()))
        fsync_dir(tmp)
        if before_commit is not None:
            before_commit()
    except BaseException:
        _remove(tmp)
        raise
    final = ckpt_dir / name
    replace_dir(tmp, final)  # a checkpoint of the same step is swapped out, then removed
    _set_latest(ckpt_dir, name)
    others = [path for path in _committed(ckpt_dir) if path.name != name]
    older = [path for path in others if _step_of(path) < step]
    newer = [path for path in others if _step_of(path) > step]
    for path in older[: max(len(older) - (keep - 1), 0)] + newer:
        _remove(_retire(ckpt_dir, path))
    return final


# --- reading ----------------------------------------------------------------------


class _Invalid(Exception):
    """Why one checkpoint failed verification (internal; becomes a warning or CheckpointError)."""


def _step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _sha256_file(path: Path) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            sha256.update(chunk)
    return sha256.hexdigest()


def _verify(ckpt: Path) -> dict[str, Any]:
    """meta.json of `ckpt` once every array's checksum matches; raises _Invalid saying why not."""
    if not ckpt.is_dir():
        raise _Invalid("does not exist")
    try:
        meta = json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise _Invalid(f"no {META} (not a committed checkpoint)") from None
    except (OSError, ValueError) as error:
        raise _Invalid(f"{META} unreadable ({error})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise _Invalid(f"format_version {version!r} is not one this code reads {READABLE_VERSIONS}")
    if _STEP_DIR.fullmatch(ckpt.name) and meta.get("step") != _step_of(ckpt):
        raise _Invalid(f"{META} says step {meta.get('step')!r}, the directory {ckpt.name}")
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict):
        raise _Invalid(f"{META} lists no arrays")
    for name, entry in arrays.items():
        if not _ARRAY_NAME.fullmatch(name) or not isinstance(entry, dict):
            raise _Invalid(f"{META} has a malformed entry for array {name!r}")
        path = ckpt / f"{name}.npy"
        if not path.is_file():
            raise _Invalid(f"{path.name} is missing")
        if _sha256_file(path) != entry.get("sha256"):
            raise _Invalid(f"sha256 of {path.name} does not match {META} (corrupt or truncated)")
    return meta


def _read_arrays(ckpt: Path, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    state = {}
    for name, entry in meta["arrays"].items():
        array = np.load(ckpt / f"{name}.npy", allow_pickle=False)
        if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
            raise _Invalid(f"{name}.npy holds {array.dtype.str} {array.shape}, unlike {META}")
        state[name] = array
    return state


def list_checkpoints(run_dir: str | os.PathLike[str], store: str = CHECKPOINTS_DIR) -> list[Path]:
    """Committed checkpoint directories of `run_dir`, oldest (lowest step) first; [] if none."""
    return _committed(Path(run_dir) / store)


def _committed(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoint directories in a store folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [path for path in ckpt_dir.iterdir() if _STEP_DIR.fullmatch(path.name)]
    return sorted((path for path in found if path.is_dir()), key=_step_of)


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Where to look in a store folder, in order: LATEST's checkpoint, then the earlier ones,
    newest first. Without a usable LATEST: every checkpoint, newest first.
    """
    committed = _committed(ckpt_dir)
    try:
        named = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        named = ""
    if not _STEP_DIR.fullmatch(named):
        return committed[::-1]
    latest = ckpt_dir / named
    return [latest] + [path for path in committed[::-1] if _step_of(path) < _step_of(latest)]


def _no_checkpoint(ckpt_dir: Path, problems: list[str]) -> CheckpointError:
    run_dir = ckpt_dir.parent
    if not run_dir.exists():
        return CheckpointError(f"no checkpoint: run directory {run_dir} does not exist")
    if not problems:
        return CheckpointError(
            f"no checkpoint in {run_dir}: {ckpt_dir.name}/ holds no step-NNNNNNN directory"
        )
    return CheckpointError(f"no valid checkpoint in {ckpt_dir}: {'; '.join(problems)}")


def _first_valid(ckpt_dir: Path, read: bool) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """The first candidate of a store folder that verifies (and its arrays when `read`);
    warns of those skipped."""
    problems: list[str] = []
    for ckpt in _candidates(ckpt_dir):
        try:
            meta = _verify(ckpt)
            state = _read_arrays(ckpt, meta) if read else {}
        except _Invalid as why:
            problems.append(f"{ckpt.name}: {why}")
            continue
        for problem in problems:
            warnings.warn(
                f"skipped checkpoint {ckpt_dir}/{problem}; falling back to {ckpt.name}",
                stacklevel=3,
            )
        return ckpt, meta, state
    raise _no_checkpoint(ckpt_dir, problems)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint `load_checkpoint(run_dir)` would load, or None if none verifies.

    Follows LATEST and the same fallback (with the same warnings); verifies
    checksums but does not load the arrays.
    """
    try:
        return _first_valid(Path(run_dir) / CHECKPOINTS_DIR, read=False)[0]
    except CheckpointError:
        return None


def choose_checkpoint(
    run_dir: str | os.PathLike[str], which: str | None = None
) -> tuple[str, Path]:
    """`--checkpoint` of every command, parsed here: 'latest' (checkpoints/, LATEST with its
    fallback), 'best' (RUN/best/: the best held-out evaluation's parameters) or 'step-N'
    (checkpoints/step-NNNNNNN/); None: best where the run kept one, else latest (what HF
    Trainer's load_best_model_at_end users expect of a finished run).

    Returns (the choice taken, the path `load_checkpoint` reads for it). UsageError for another
    word; CheckpointError, one line, when the run has no best/ or no such step.
    """
    run_dir = Path(run_dir)
    if which is None:
        which = "best" if _committed(run_dir / BEST_DIR) else "latest"
    if which in STORES:
        store = run_dir / STORES[which]
        if which == "best" and not store.is_dir():
            raise CheckpointError(
                f"{run_dir}: no {BEST_DIR}/ (this run kept no best checkpoint); "
                "use --checkpoint latest or step-N"
            )
        return which, store
    match = _CHOICE_STEP.fullmatch(which)
    if match is None:
        raise UsageError(f"--checkpoint {which!r}: use {CHOICES} (e.g. step-1200)")
    path = run_dir / CHECKPOINTS_DIR / step_dir_name(int(match.group(1)))
    if not path.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoint {path.name} (see {path.parent})")
    return which, path


def describe_choice(run_dir: str | os.PathLike[str], which: str, step: int) -> list[str]:
    """What every command that read a run's checkpoint says about it: one line naming it
    (`which` as `choose_checkpoint` returned it, at `step`), and one more when it is best/
    and that is the untrained step 0 or not even half as far as the latest checkpoint, naming
    the flag that takes the latest. Lines without the 'twotower: ' prefix."""
    run_dir = Path(run_dir)
    words = {"best": "best/ (its best held-out evaluation)", "latest": "its latest checkpoint"}
    named = f"{shown_path(run_dir)}: {words.get(which, which)}, step {step}"
    lines = [f"{named} (--checkpoint {CHOICES} picks another)"]
    newest = _committed(run_dir / CHECKPOINTS_DIR)
    latest = _step_of(newest[-1]) if newest else None
    if which == "best" and latest is not None and latest > 0:
        if step == 0:
            lines.append(
                "best/ holds the untrained step 0 (no evaluation since beat it, or none ran "
                f"yet); the latest checkpoint is step {latest}: --checkpoint latest takes it"
            )
        elif 2 * step < latest:
            lines.append(
                f"best/ (step {step}) is far behind the latest checkpoint (step {latest}), "
                "no later evaluation beat it: --checkpoint latest takes the latest"
            )
    return lines


def load_checkpoint(
    path: str | os.PathLike[str], which: str = "latest"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load and verify a checkpoint: `path` is a run directory, one of its store folders
    (`checkpoints/`, `best/`) or one checkpoint directory.

    A run directory gives, with which="latest", the checkpoint checkpoints/LATEST names or,
    if it fails verification, the newest earlier one that passes (a warning names each one
    skipped and why), without a usable LATEST the newest that passes; with which="best", the
    same from `best/`; with which="step-N", that checkpoint (see `choose_checkpoint`). A store
    folder is read the same way; a checkpoint directory is verified with no fallback. Returns
    (meta.json as a dict, {array name: array with its saved shape and dtype}). Raises
    CheckpointError, one line naming the directory and each candidate's fault; UsageError for
    another `which`.
    """
    path = Path(path)
    is_store = path.name in STORES.values() and not (path / CHECKPOINTS_DIR).is_dir()
    if not is_store and not (path / META).exists() and not _STEP_DIR.fullmatch(path.name):
        path = choose_checkpoint(path, which)[1]
    if (path / META).exists() or _STEP_DIR.fullmatch(path.name):
        try:
            meta = _verify(path)
            return meta, _read_arrays(path, meta)
        except _Invalid as why:
            raise CheckpointError(f"checkpoint {path} is not valid: {why}") from None
    _, meta, state = _first_valid(path, read=True)
    return meta, state


def load_record(
    path: str | os.PathLike[str], which: str = "latest"
) -> tuple[CheckpointMeta, dict[str, np.ndarray]]:
    """`load_checkpoint` with meta.json as its typed record (`run.records.CheckpointMeta`):
    what every command of twotower reads a checkpoint with. Raises as `load_checkpoint`."""
    meta, state = load_checkpoint(path, which)
    return CheckpointMeta.from_dict(meta), state

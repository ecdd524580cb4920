"""`twotower doctor --data PATH`: the dataset's layout, a .npz's hidden cost, memory and disk.

Reads .npy headers and the zip directory only (never the arrays), so it is
quick on an 11 GB file. Memory and disk are weighed against a run with the
default settings (`TrainConfig`): the bank is read in full by every mining
pass, a faiss or hnswlib worker holds a copy of it, and a run keeps
`keep_checkpoints` + 1 checkpoints and mined tables on disk.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from twotower.config import TrainConfig
from twotower.data import KEYS, npz_cache_dirs
from twotower.data.npy import Header, Source, data_error, file_source, npz_sources, read_header
from twotower.data.validate import check_layout, dataset_keys
from twotower.diagnose.findings import Finding
from twotower.errors import DataError
from twotower.paths import user_cache_dir
from twotower.process.memory import available_bytes
from twotower.run.disk import existing_parent, free_bytes
from twotower.towers import TowerSpec

GB = 1e9


@dataclass(frozen=True)
class DataLayout:
    """A dataset's arrays as their headers describe them: where each lives, shape and dtype."""

    path: Path
    sources: dict[str, Source]
    headers: dict[str, Header]

    @property
    def is_npz(self) -> bool:
        """Whether the dataset is a .npz (else a directory of .npy files)."""
        return not self.path.is_dir()

    def nbytes(self, key: str) -> int:
        """Bytes of one array's data once unpacked."""
        return self.headers[key].nbytes


def read_layout(path: Path) -> DataLayout:
    """Headers and layout checks of a dataset directory or .npz; raises DataError (one line)."""
    if path.is_dir():
        members = {
            key: file_source(path / f"{key}.npy", key)
            for key in KEYS
            if (path / f"{key}.npy").is_file()
        }
    elif path.is_file():
        members = npz_sources(path)
    else:
        raise data_error(str(path), "no such file or directory")
    present = set(members) & set(KEYS)
    keys = dataset_keys(present, str(path), lambda key: f"has no {key} array")
    sources = {key: members[key] for key in keys}
    headers = {key: read_header(source) for key, source in sources.items()}
    check_layout(sources, headers)
    return DataLayout(path, sources, headers)


def gb(size: float) -> str:
    """Bytes as GB, three significant digits: 2371074048 -> '2.37 GB', 1234567 -> '0.00123 GB'."""
    return f"{size / GB:.3g} GB"


def available_memory() -> tuple[int, str]:
    """(bytes of memory a run can use without swapping, where that number comes from)."""
    return available_bytes(), "psutil: available without swapping"


def _data_finding(layout: DataLayout) -> Finding:
    headers = layout.headers
    context_key = "contexts" if "contexts" in headers else "context_ids"
    n, t = headers[context_key].shape[:2]
    m, d = headers["bank"].shape
    sizes = {key: layout.nbytes(key) for key in headers}
    kind = ".npz, see the npz check" if layout.is_npz else "directory, memory-mapped"
    return Finding(
        "data",
        "ok",
        f"{layout.path} ({kind}): N={n} samples, T={t}, bank {m} x {d} "
        f"{headers['bank'].dtype} ({gb(sizes['bank'])}), {context_key} {gb(sizes[context_key])}; "
        f"{gb(sum(sizes.values()))} in all",
        "",
        {"bytes": sizes},
    )


def _npz_finding(layout: DataLayout) -> Finding:
    """Whether the .npz has compressed members, what reading them costs, and where they go."""
    npz = layout.path
    compressed = [key for key, source in layout.sources.items() if source.compressed]
    details = {"compressed": compressed, "unpacked_bytes": 0}
    if not compressed:
        return Finding(
            "npz",
            "ok",
            f"every member of {npz.name} is stored (not compressed): mapped in place, "
            "nothing read whole",
            "",
            details,
        )
    size = sum(layout.sources[key].size for key in compressed)
    details["unpacked_bytes"] = size
    caches = npz_cache_dirs(npz)
    done = [c for c in caches if all((c / f"{key}.npy").is_file() for key in compressed)]
    if done:
        return Finding(
            "npz",
            "ok",
            f"{', '.join(compressed)} are compressed ({gb(size)}) and were unpacked "
            f"before into {done[0]}: mapped from there",
            "",
            details,
        )
    target = next((c for c in caches if os.access(existing_parent(c), os.W_OK)), None)
    convert = f"`twotower convert {npz} --out DIR`"
    head = (
        f"{', '.join(compressed)} compressed in {npz.name}: np.load reads {gb(size)} whole on "
        "every access"
    )
    if target is None:
        return Finding(
            "npz",
            "fail",
            f"{head}; neither {' nor '.join(map(str, caches))} is writable to unpack them into",
            f"run {convert} into a writable directory",
            details,
        )
    free = free_bytes(target)
    where = f"twotower unpacks them once, streamed, into {target} ({gb(free)} free there)"
    if free < size:
        return Finding(
            "npz",
            "fail",
            f"{head}; {where}, which is too little",
            f"free disk there or run {convert} on a disk with {gb(size)} free",
            details,
        )
    return Finding(
        "npz",
        "warn",
        f"{head}; {where}",
        f"let the first run unpack them ({gb(size)} of disk), "
        f"or run {convert} once; np.savez (not _compressed) files map in place",
        details,
    )


def _run_sizes(layout: DataLayout, config: TrainConfig) -> dict[str, int]:
    """Bytes a default run holds: bank, mined table, queue, one checkpoint."""
    m, d = layout.headers["bank"].shape
    n = layout.headers["positives"].shape[0]
    hidden = config.hidden if config.tower == "gru" else d
    spec = TowerSpec(config.tower, d, hidden, config.layers, config.proj)
    parameters = sum(math.prod(shape) for shape in spec.shapes().values())
    queue = config.queue_size * (d * 4 + 8)
    return {
        "bank": layout.nbytes("bank"),
        "table": n * config.mine_pool * 8,
        "queue": queue,
        "checkpoint": 3 * parameters * 4 + queue,  # parameters and two AdamW moments
    }


def _memory_finding(sizes: dict[str, int], memory: tuple[int, str]) -> Finding:
    available, source = memory
    bank = sizes["bank"]
    need = bank + sizes["table"] + sizes["queue"]
    details = {
        **sizes,
        "available": available,
        "needed": need,
        "needed_with_ann_worker": need + bank,
    }
    head = (
        f"bank {gb(bank)} (read in full by every mining pass) + mined table and queue "
        f"{gb(need - bank)} = {gb(need)}; a faiss or hnswlib worker holds another copy of the "
        f"bank: {gb(need + bank)}; available {gb(available)} ({source})"
    )
    if need > available:
        return Finding(
            "memory",
            "warn",
            head,
            "the bank does not fit: every mining and evaluation pass "
            "reads it from disk again; free memory or mine less often (--mine-every)",
            details,
        )
    if need + bank > available:
        return Finding(
            "memory",
            "warn",
            head,
            "--miner faiss or hnswlib would not fit beside the run; "
            "use --miner exact (it reads the memory-mapped bank in chunks)",
            details,
        )
    return Finding("memory", "ok", head, "", details)


def _disk_finding(sizes: dict[str, int], config: TrainConfig) -> Finding:
    runs = Path(config.out or "runs").parent
    kept = config.keep_checkpoints + 1  # the one being written before the oldest is pruned
    need = kept * (sizes["checkpoint"] + sizes["table"])
    index_dir = user_cache_dir() / "index"
    free, index_free = free_bytes(runs), free_bytes(index_dir)
    details = {"runs_dir": str(runs.absolute()), "needed": need, "free": free}
    head = (
        f"{kept} checkpoints + mined tables of a default run: {gb(need)}, {gb(free)} free at "
        f"{existing_parent(runs)}; a faiss/hnswlib index cache of up to {gb(sizes['bank'])} goes "
        f"to {index_dir} ({gb(index_free)} free)"
    )
    if free < need:
        return Finding("disk", "fail", head, "free disk or give --out on a disk with room", details)
    if index_free < sizes["bank"]:
        return Finding(
            "disk",
            "warn",
            head,
            "free disk for the index cache (or set TWOTOWER_CACHE) "
            "before using --miner faiss or hnswlib",
            details,
        )
    return Finding("disk", "ok", head, "", details)


def check_data(path: str | os.PathLike[str]) -> list[Finding]:
    """Findings for a dataset: layout and sizes, a .npz's compressed members, memory, disk."""
    try:
        layout = read_layout(Path(path))
    except DataError as error:
        return [
            Finding(
                "data",
                "fail",
                str(error),
                "fix the dataset as the message says (`twotower train` then checks the values too)",
            )
        ]
    config = TrainConfig(data=str(path))
    sizes = _run_sizes(layout, config)
    findings = [_data_finding(layout)]
    if layout.is_npz:
        findings.append(_npz_finding(layout))
    findings.append(_memory_finding(sizes, available_memory()))
    findings.append(_disk_finding(sizes, config))
    return findings

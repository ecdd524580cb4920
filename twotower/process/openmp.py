"""Which OpenMP and BLAS thread pools a process has loaded, and with how many threads.

This process: threadpoolctl's view (`threadpools`, `openmp_runtimes`), on
Linux, macOS and Windows: each pool's internal API (openmp, openblas, mkl,
...), file path, version and thread count. Shared by the trainer (it records
its own into its heartbeat), the miner worker and the doctor's census.

This is the one module that imports threadpoolctl: importing it sets
KMP_DUPLICATE_LIB_OK=True in the environment (for scikit-learn's sake), which
would silence Intel's and LLVM's OpenMP duplicate-runtime abort in this
process and every child it starts. The import here leaves the variable as it was.

Another process (`mapped_openmp_runtimes`): threadpoolctl sees only the process
it runs in, so `twotower watch`, whose child is not ours to instrument, lists
the child's mapped files through psutil (Linux and Windows; macOS gives no
other process's mappings) and picks the OpenMP runtimes by file name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import psutil

from twotower.process.memory import process_tree

# the variables that size a process's OpenMP and BLAS pools when they load (read once, at load)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _environment_kept(name: str) -> Iterator[None]:
    """Restore environment variable `name` (set or unset) after the block."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


with _environment_kept("KMP_DUPLICATE_LIB_OK"):
    from threadpoolctl import threadpool_info, threadpool_limits

# file-name prefixes of Intel's, GNU's, LLVM's and MSVC's OpenMP (libiomp5 tested before libomp)
OPENMP_RUNTIMES = ("libiomp5", "libgomp", "libomp", "vcomp")
POOL_FIELDS = ("user_api", "internal_api", "prefix", "filepath", "version", "num_threads")


def threadpools() -> list[dict[str, Any]]:
    """threadpoolctl's thread pools of this process, one dict each: user_api ('openmp' or
    'blas'), internal_api ('openmp', 'openblas', 'mkl', ...), prefix ('libgomp', ...),
    filepath, version (None where unknown), num_threads, and for BLAS threading_layer."""
    pools = []
    for info in threadpool_info():
        pool = {key: info.get(key) for key in POOL_FIELDS}
        if "threading_layer" in info:
            pool["threading_layer"] = info["threading_layer"]
        pools.append(pool)
    return pools


def limit_pools(count: int) -> None:
    """Limit every OpenMP and BLAS pool loaded in this process now to `count` threads
    (threadpoolctl; a library loaded later keeps its own default)."""
    threadpool_limits(limits=count)


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes loaded in this process (threadpoolctl), sorted."""
    return sorted({pool["filepath"] for pool in threadpools() if pool["internal_api"] == "openmp"})


def mapped_openmp_runtimes(pid: int, tree: bool = False) -> list[str] | None:
    """Paths of the OpenMP runtimes another process maps, sorted, through psutil's
    memory_maps; None where that cannot be known (macOS, a process gone or not ours).
    tree: those of the process and every process it started, together."""
    pids = process_tree(pid) if tree else [pid]
    found: set[str] | None = None
    for one in pids:
        try:
            maps = psutil.Process(one).memory_maps(grouped=True)
        except (AttributeError, psutil.Error):  # AttributeError: no memory_maps here (macOS)
            continue
        found = (found or set()) | {m.path for m in maps if runtime_of(m.path)}
    return sorted(found) if found is not None else None


def runtime_of(path: str) -> str | None:
    """The OpenMP runtime a library file is ('libgomp', 'libomp', ...), or None."""
    base = os.path.basename(path).lower()
    for prefix in OPENMP_RUNTIMES:
        rest = base[len(prefix) :]
        if base.startswith(prefix) and (not rest or not rest[0].isalpha() or rest[:2] == "md"):
            return prefix
    return None


def owner_of(path: str) -> str:
    """Which installed package ships a library: the folder under site-packages, else 'system'.

    '.../site-packages/faiss_cpu.libs/libgomp-e985bcbb.so.1' -> 'faiss_cpu'.
    """
    parts = path.replace("\\", "/").split("/")
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts and parts.index(anchor) + 1 < len(parts):
            top = parts[parts.index(anchor) + 1]
            return top.removesuffix(".libs").removesuffix(".dylibs")
    return "system"

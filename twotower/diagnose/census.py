"""The OpenMP census: which threading runtimes numpy, torch and faiss load together.

`take_census()` starts a fresh interpreter (`python -c`) that runs
`census_main`: it imports numpy, torch and faiss (each one installed, in that
order) and reports threadpoolctl's view of its thread pools
(`twotower.process.openmp.threadpools`): each OpenMP runtime (libgomp, libomp,
libiomp5, vcomp) and BLAS build (OpenBLAS, MKL, ...) with its file path,
version and thread count. `Census` says whether two distinct OpenMP runtimes
share the process: the clash behind silent segfaults in faiss + torch
programs (faiss issue 4273, pytorch issue 149201, faiss-wheels issue 100). The
child also tries torch's NumPy bridge, which fails when torch was built
against NumPy 1.x and NumPy 2 is installed.

A child that dies while importing is a finding too: `Census.died` names the
signal and the import it was in.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from twotower.process.exit_status import ExitStatus
from twotower.process.openmp import owner_of, threadpools

MODULES = ("numpy", "torch", "faiss")
TIMEOUT = 120.0  # seconds for the child's imports (torch alone takes a few on a cold disk)

# The child: twotower itself imports numpy only, so what it loads is what the modules load.
CHILD = "import sys; from twotower.diagnose.census import census_main; census_main(sys.argv[1:])"


def census_main(modules: list[str]) -> None:
    """The census child: import `modules` (those installed), then report, one JSON per line.

    Each import is announced before and after, so a crash names the one it was in.
    """

    def say(**record: Any) -> None:
        print(json.dumps(record), flush=True)

    caught: list[str] = []
    for name in modules:
        if importlib.util.find_spec(name) is None:
            continue
        say(importing=name)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            module = importlib.import_module(name)
        caught += [f"{name}: {w.message}" for w in seen]
        say(imported=name, version=str(getattr(module, "__version__", "?")))
    pools = threadpools()
    bridge = None
    if "torch" in sys.modules and "numpy" in sys.modules:
        import numpy
        import torch

        try:
            torch.from_numpy(numpy.arange(3.0)).sum().item()
            bridge = "ok"
        except Exception as error:  # any failure of the bridge is the finding
            bridge = f"{type(error).__name__}: {error}"
    say(threadpools=pools, bridge=bridge, warnings=caught)


@dataclass(frozen=True)
class Library:
    """One loaded thread pool: its kind (threadpoolctl's prefix: 'libgomp', 'libomp',
    'libopenblas', ...), internal API ('openmp', 'openblas', 'mkl', ...), path, owner
    (the package that ships it), version (None where unknown) and thread count."""

    kind: str
    path: str
    owner: str
    api: str = "openmp"
    version: str | None = None
    num_threads: int | None = None
    threading: str = ""  # BLAS: the threading layer it reports (pthreads, openmp, ...)

    def as_dict(self) -> dict[str, Any]:
        """The library as a JSON-ready object."""
        return asdict(self)


@dataclass
class Census:
    """What the fresh child loaded.

    imported: module -> version, in import order; openmp / blas: the thread
    pools threadpoolctl found (`classify`); bridge: "ok", the error of
    torch.from_numpy, or None without torch; warnings: what the imports warned
    (module: text); stderr: the child's stderr; died: a description of how the
    child ended abnormally (signal or exit code, and the import it was in), else None.
    """

    imported: dict[str, str] = field(default_factory=dict)
    openmp: list[Library] = field(default_factory=list)
    blas: list[Library] = field(default_factory=list)
    bridge: str | None = None
    warnings: list[str] = field(default_factory=list)
    stderr: str = ""
    died: str | None = None

    @property
    def distinct_openmp(self) -> list[Library]:
        """One OpenMP runtime per distinct file (realpath): two entries are two thread pools."""
        seen: dict[str, Library] = {}
        for library in self.openmp:
            seen.setdefault(os.path.realpath(library.path), library)
        return list(seen.values())


def classify(pools: list[dict[str, Any]]) -> tuple[list[Library], list[Library]]:
    """(OpenMP runtimes, BLAS builds) among threadpoolctl's `pools` (`openmp.threadpools`)."""
    runtimes: list[Library] = []
    blas: list[Library] = []
    for pool in pools:
        library = Library(
            kind=pool["prefix"],
            path=pool["filepath"],
            owner=owner_of(pool["filepath"]),
            api=pool["internal_api"],
            version=pool.get("version"),
            num_threads=pool.get("num_threads"),
            threading=pool.get("threading_layer") or "",
        )
        (runtimes if pool["user_api"] == "openmp" else blas).append(library)
    return runtimes, blas


def take_census(modules: tuple[str, ...] = MODULES, timeout: float = TIMEOUT) -> Census:
    """Import `modules` in a fresh child of this interpreter and list its thread pools.

    The child inherits this environment (OMP_NUM_THREADS, KMP_DUPLICATE_LIB_OK,
    ...). Never raises for what happens in the child: a crash or a timeout is
    described in `Census.died`.
    """
    census = Census()
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, *modules],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        census.died = f"did not finish its imports within {timeout:.0f} s"
        return census
    census.stderr = child.stderr
    importing = None
    for line in child.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a library printed something of its own
        if "importing" in record:
            importing = record["importing"]
        elif "imported" in record:
            census.imported[record["imported"]] = record["version"]
            importing = None
        elif "threadpools" in record:
            census.openmp, census.blas = classify(record["threadpools"])
            census.bridge = record["bridge"]
            census.warnings = record["warnings"]
    if child.returncode != 0:
        where = f"while importing {importing}" if importing else "after its imports"
        census.died = f"{ExitStatus(child.returncode).describe(meaning=False)} {where}"
    return census

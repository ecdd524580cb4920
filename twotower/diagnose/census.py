"""The OpenMP census: which threading runtimes numpy, torch and faiss load together.

`take_census()` starts a fresh interpreter (`python -c`) that runs
`census_main`: it imports numpy, torch and faiss (each one installed, in that
order) and lists every file the process has mapped with `loaded_libraries()`
(/proc/self/maps on Linux, the dyld image list through ctypes on macOS; also
usable on this process, or on another pid on Linux). `Census` sorts them into
OpenMP runtimes (libgomp, libomp, libiomp5, vcomp) and OpenBLAS builds (with
the threading each reports), and says whether two distinct OpenMP runtimes
share the process: the clash behind silent segfaults in faiss + torch
programs (faiss issue 4273, pytorch issue 149201, faiss-wheels issue 100). The
child also tries torch's NumPy bridge, which fails when torch was built
against NumPy 1.x and NumPy 2 is installed.

A child that dies while importing is a finding too: `Census.died` names the
signal and the import it was in.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from twotower.openmp import loaded_libraries, owner_of, runtime_of

MODULES = ("numpy", "torch", "faiss")
TIMEOUT = 120.0  # seconds for the child's imports (torch alone takes a few on a cold disk)

OPENBLAS_THREADING = {0: "sequential", 1: "pthreads", 2: "OpenMP"}

# The child: twotower itself imports numpy only, so what it loads is what the modules load.
CHILD = "import sys; from twotower.diagnose.census import census_main; census_main(sys.argv[1:])"


def openblas_builds(paths: list[str]) -> dict[str, dict[str, Any]]:
    """path -> {"parallel": 0|1|2, "config": str} for each OpenBLAS among loaded `paths`.

    Asks each library itself (openblas_get_parallel / get_config, or numpy's
    scipy_openblas*64_ names) through ctypes; the files are loaded already, so
    nothing new is mapped.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        if "openblas" not in os.path.basename(path).lower():
            continue
        library = ctypes.CDLL(path)
        for prefix, suffix in (("", ""), ("", "64_"), ("scipy_", ""), ("scipy_", "64_")):
            parallel = getattr(library, f"{prefix}openblas_get_parallel{suffix}", None)
            config = getattr(library, f"{prefix}openblas_get_config{suffix}", None)
            if parallel is None:
                continue
            if config is not None:
                config.restype = ctypes.c_char_p
            text = config().decode(errors="replace") if config is not None else ""
            found[path] = {"parallel": int(parallel()), "config": " ".join(text.split())}
    return found


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
    paths = loaded_libraries()
    bridge = None
    if "torch" in sys.modules and "numpy" in sys.modules:
        import numpy
        import torch

        try:
            torch.from_numpy(numpy.arange(3.0)).sum().item()
            bridge = "ok"
        except Exception as error:  # any failure of the bridge is the finding
            bridge = f"{type(error).__name__}: {error}"
    say(libraries=paths, openblas=openblas_builds(paths or []), bridge=bridge, warnings=caught)


@dataclass(frozen=True)
class Library:
    """One loaded library of interest: its kind ('libgomp', 'openblas', ...), path and owner."""

    kind: str
    path: str
    owner: str
    threading: str = ""  # OpenBLAS: sequential, pthreads or OpenMP, as it reports
    build: str = ""  # OpenBLAS: its openblas_get_config() string

    def as_dict(self) -> dict[str, str]:
        """The library as a JSON-ready object."""
        return asdict(self)


@dataclass
class Census:
    """What the fresh child loaded.

    imported: module -> version, in import order; libraries: every loaded file
    (None where this platform gives no list); openmp / openblas: the
    libraries of interest; bridge: "ok", the error of torch.from_numpy, or
    None without torch; warnings: what the imports warned (module: text);
    stderr: the child's stderr; died: a description of how the child ended
    abnormally (signal or exit code, and the import it was in), else None.
    """

    imported: dict[str, str] = field(default_factory=dict)
    libraries: list[str] | None = None
    openmp: list[Library] = field(default_factory=list)
    openblas: list[Library] = field(default_factory=list)
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


def classify(
    paths: list[str], openblas: dict[str, dict[str, Any]]
) -> tuple[list[Library], list[Library]]:
    """(OpenMP runtimes, OpenBLAS builds) among loaded `paths`, each a list of Library.

    openblas: path -> {"parallel": 0|1|2, "config": str}, as the child reports them.
    """
    runtimes, blas = [], []
    for path in paths:
        kind = runtime_of(path)
        if kind is not None:
            runtimes.append(Library(kind, path, owner_of(path)))
        elif "openblas" in os.path.basename(path).lower():
            info = openblas.get(path, {})
            threading = OPENBLAS_THREADING.get(info.get("parallel", -1), "unknown")
            blas.append(
                Library("openblas", path, owner_of(path), threading, info.get("config", ""))
            )
    return runtimes, blas


def _how_it_died(returncode: int, last_import: str | None) -> str:
    where = f"while importing {last_import}" if last_import else "after its imports"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} {where}"
    return f"exited with code {returncode} {where}"


def take_census(modules: tuple[str, ...] = MODULES, timeout: float = TIMEOUT) -> Census:
    """Import `modules` in a fresh child of this interpreter and list what it loaded.

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
        elif "libraries" in record:
            census.libraries = record["libraries"]
            census.openmp, census.openblas = classify(record["libraries"] or [], record["openblas"])
            census.bridge = record["bridge"]
            census.warnings = record["warnings"]
    if child.returncode != 0:
        census.died = _how_it_died(child.returncode, importing)
    return census

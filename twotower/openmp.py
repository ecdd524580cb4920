"""Which OpenMP runtimes a process has loaded: the files it maps, and which are OpenMP.

`loaded_libraries` lists a process's mapped files (/proc/PID/maps on Linux, the
dyld image list through ctypes on macOS); `runtime_of` and `owner_of` say
which of them is an OpenMP runtime and which package ships it. Shared by the
trainer (its heartbeat), crash forensics and the doctor's census.
"""

from __future__ import annotations

import ctypes
import os
import sys

# file-name prefixes of Intel's, GNU's, LLVM's and MSVC's OpenMP (libiomp5 tested before libomp)
OPENMP_RUNTIMES = ("libiomp5", "libgomp", "libomp", "vcomp")


def loaded_libraries(pid: int | None = None) -> list[str] | None:
    """Paths of every file mapped into a process, sorted; None where that cannot be known.

    pid None: this process (Linux: /proc/self/maps; macOS: the dyld image list
    through ctypes). Another pid: Linux only (/proc/PID/maps, if readable).
    """
    if os.path.exists("/proc/self/maps"):
        try:
            with open(f"/proc/{pid or 'self'}/maps") as maps:
                fields = [line.split(maxsplit=5) for line in maps]
        except OSError:
            return None
        return sorted({f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/")})
    if sys.platform == "darwin" and pid is None:
        dyld = ctypes.CDLL(None)
        dyld._dyld_get_image_name.restype = ctypes.c_char_p
        names = (dyld._dyld_get_image_name(i) for i in range(dyld._dyld_image_count()))
        return sorted({name.decode(errors="replace") for name in names if name})
    return None


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


def openmp_runtimes(pid: int | None = None) -> list[str] | None:
    """Paths of the OpenMP runtimes (libgomp, libomp, libiomp5, ...) loaded in a process.

    pid None: this process; another pid: Linux only. None where it cannot be
    known (see `loaded_libraries`, the census `twotower doctor` takes).
    """
    paths = loaded_libraries(pid)
    if paths is None:
        return None
    return [path for path in paths if runtime_of(path)]

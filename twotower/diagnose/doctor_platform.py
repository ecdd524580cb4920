"""doctor's checks of this machine and platform: memory and swap, the thread budget, and
what matters on a Mac.

Everywhere (psutil): the machine's available memory and swap in use, and the
thread budget a run would get (`twotower.process.threads`). On macOS: MPS built into
this torch and available, Python running natively on Apple silicon (not under
Rosetta 2, where torch has no MPS), `PYTORCH_ENABLE_MPS_FALLBACK`, and the
torch / numpy combination an Intel Mac is stuck with. A Mac-only check
elsewhere is an ok finding that says "not applicable here".

Each check takes what it judges as arguments (`Platform`, readings,
versions), so the macOS paths are tested on any machine.
"""

from __future__ import annotations

import platform
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from twotower.diagnose.findings import Finding
from twotower.process.threads import thread_budget

GB = 1e9
LOW_AVAILABLE = 0.10  # share of physical memory below which a run is likely to be killed
MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: '2.13.0+cpu' -> (2, 13, 0)."""
    match = re.match(r"\d+(\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


@dataclass(frozen=True)
class Platform:
    """What the macOS checks depend on: system ('Darwin', 'Linux', ...), machine ('arm64',
    'x86_64'), whether this Python runs translated by Rosetta 2, and torch's MPS flags
    (None: torch is not installed)."""

    system: str
    machine: str
    translated: bool = False
    mps_built: bool | None = None
    mps_available: bool | None = None

    @property
    def macos(self) -> bool:
        """Whether this is macOS."""
        return self.system == "Darwin"


def this_platform() -> Platform:
    """This machine's `Platform` (imports torch, when installed, for its MPS flags)."""
    translated = False
    if platform.system() == "Darwin":
        try:
            answer = subprocess.run(
                ["sysctl", "-n", "sysctl.proc_translated"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            translated = answer.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            translated = False
    try:
        import torch
    except ImportError:
        return Platform(platform.system(), platform.machine(), translated)
    mps = torch.backends.mps
    return Platform(
        platform.system(), platform.machine(), translated, mps.is_built(), mps.is_available()
    )


def not_here(check: str, why: str) -> Finding:
    """The finding of a check that does not apply on this platform."""
    return Finding(check, "ok", f"not applicable here: {why}")


def check_mps(where: Platform) -> Finding:
    """MPS built into this torch and available on this Mac; not applicable off macOS."""
    if not where.macos:
        return not_here("mps", "MPS needs macOS on Apple silicon")
    if where.mps_built is None:
        return Finding("mps", "warn", "torch is not installed", "pip install torch")
    if where.mps_available:
        return Finding("mps", "ok", "torch.backends.mps is built and available")
    if not where.mps_built:
        return Finding(
            "mps",
            "warn",
            "this torch was built without MPS (torch.backends.mps.is_built() is False)",
            "install the macOS arm64 wheel: pip install torch",
        )
    return Finding(
        "mps",
        "warn",
        f"this torch has MPS but no device is available (machine {where.machine})",
        "MPS needs Apple silicon and macOS 12.3 or later; see the rosetta check",
    )


def check_rosetta(where: Platform) -> Finding:
    """Python on Apple silicon must run natively: under Rosetta 2 torch has no MPS."""
    if not where.macos:
        return not_here("rosetta", "Rosetta 2 is macOS only")
    if where.translated:
        return Finding(
            "rosetta",
            "fail",
            "this Python is an x86_64 build running under Rosetta 2 on Apple silicon: torch "
            "sees no MPS device and runs translated CPU code",
            "install an arm64 Python (python3 -c 'import platform; print(platform.machine())' "
            "prints arm64) and reinstall torch into it",
        )
    return Finding("rosetta", "ok", f"Python runs natively ({where.machine})")


def check_mps_fallback(where: Platform, environ: Mapping[str, str]) -> Finding:
    """PYTORCH_ENABLE_MPS_FALLBACK: torch reads only '1'; not applicable off macOS."""
    value = environ.get(MPS_FALLBACK)
    if not where.macos:
        shown = "unset" if value is None else f"{MPS_FALLBACK}={value}"
        return not_here(MPS_FALLBACK, f"MPS is macOS only ({shown})")
    if value is None:
        return Finding(MPS_FALLBACK, "ok", "unset: an operation MPS lacks raises an error")
    if value == "1":
        return Finding(
            MPS_FALLBACK,
            "ok",
            f"{MPS_FALLBACK}=1: operations MPS lacks run on the CPU (slower)",
        )
    return Finding(
        MPS_FALLBACK,
        "warn",
        f"{MPS_FALLBACK}={value!r}: torch reads only '1'",
        "set it to 1 or unset it",
    )


def check_mac_versions(where: Platform, versions: Mapping[str, str]) -> Finding:
    """The torch / numpy combination on a Mac: Intel Macs get no torch after 2.2, which
    was built against NumPy 1.x."""
    if not where.macos:
        return not_here("torch-macos", "macOS only")
    torch, numpy = (
        version_tuple(versions.get("torch", "")),
        version_tuple(versions.get("numpy", "")),
    )
    shown = f"torch {versions.get('torch', 'missing')}, numpy {versions.get('numpy', 'missing')}"
    if where.machine == "x86_64" and not where.translated and torch and torch < (2, 3):
        if numpy >= (2,):
            return Finding(
                "torch-macos",
                "fail",
                f"{shown} on an Intel Mac: torch 2.2 is the last build for Intel Macs and was "
                "built against NumPy 1.x",
                "pip install 'numpy<2'",
            )
        return Finding(
            "torch-macos", "ok", f"{shown}: an Intel Mac's last torch, with NumPy 1.x as it needs"
        )
    return Finding("torch-macos", "ok", f"{shown} on {where.machine}")


def check_memory_pressure(memory: Mapping[str, int]) -> Finding:
    """Available memory and swap in use (`memory.machine_memory`): little left means the
    OOM killer or macOS jetsam may end a run without a traceback."""
    total, available = memory["total"], memory["available"]
    swap = f"swap {memory['swap_used'] / GB:.2f} of {memory['swap_total'] / GB:.2f} GB in use"
    evidence = f"{available / GB:.2f} GB of {total / GB:.2f} GB available; {swap} (psutil)"
    if available < LOW_AVAILABLE * total:
        return Finding(
            "memory-pressure",
            "warn",
            evidence,
            "close other programs before training: with this little memory left the OOM "
            "killer (Linux) or jetsam (macOS) ends the largest process without a traceback",
            dict(memory),
        )
    return Finding("memory-pressure", "ok", evidence, "", dict(memory))


def check_threads(cores: int) -> Finding:
    """The thread budget a run would get on `cores` cores, by `twotower.process.threads`' rule."""
    cases = {
        "exact miner in the trainer": thread_budget(cores),
        "faiss/hnswlib worker": thread_budget(cores, miner_in_worker=True),
        "worker mining while training": thread_budget(cores, miner_in_worker=True, overlapped=True),
    }
    rows = "".join(f"\n{case}: {budget.describe()}" for case, budget in cases.items())
    return Finding(
        "threads",
        "ok",
        f"{cores} usable cores; each process's default thread budget:{rows}",
        "",
        {case: budget.as_dict() for case, budget in cases.items()},
    )

"""`twotower doctor`: environment and data checks, each an ok / warn / fail finding.

Every check returns `Finding`s that say what was looked at (evidence) and
what to do. `diagnose(data)` runs them all: Python and library versions
against known-bad combinations, the OpenMP census of a fresh child process
(`twotower.diagnose.census`), the environment variables that change threading,
how idle OpenMP threads wait, whether other processes crowd the cores now (`process.stalls`),
the thread budget, memory pressure and swap, the engines this machine can run,
what matters on a Mac (`twotower.diagnose.doctor_platform`), and, given a dataset, its layout, a
compressed .npz's cost, and memory and disk against a run with the default
settings (`twotower.diagnose.doctor_data`). Exit code: 0 when nothing fails, 1 when
something does (`exit_code`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict

from twotower.diagnose.census import MODULES, Census, Library, take_census
from twotower.diagnose.doctor_data import check_data
from twotower.diagnose.doctor_platform import (
    Platform,
    check_mac_versions,
    check_memory_pressure,
    check_mps,
    check_mps_fallback,
    check_rosetta,
    check_threads,
    this_platform,
    version_tuple,
)
from twotower.diagnose.findings import STATUSES, Finding
from twotower.process import stalls, wait_policy
from twotower.process.memory import machine_memory
from twotower.process.openmp import THREAD_VARIABLES
from twotower.process.threads import usable_cores

INDENT = " " * 8  # evidence lines after the first, and what to do
DISTRIBUTIONS = ("numpy", "torch", "faiss-cpu", "faiss-gpu", "hnswlib")
TESTED_PYTHONS = ((3, 10), (3, 13))
TRUE_WORDS = ("1", "true", "yes", "on", "y", "t", ".true.")  # what Intel's runtime reads as true
CLASH = (
    "two OpenMP runtimes in one process can crash it without a traceback (faiss issue 4273, "
    "pytorch issue 149201, faiss-wheels issue 100)"
)
ISOLATION = (
    "twotower runs faiss and hnswlib in their own worker process by default "
    "(--miner-isolation process), so its trainer never loads both; in your own scripts, "
    "search with faiss in a separate process, or install torch and faiss from one channel "
    "that shares one runtime. KMP_DUPLICATE_LIB_OK=TRUE hides Intel's duplicate-runtime "
    "check but not the problem"
)


def installed_versions() -> dict[str, str]:
    """Distribution name -> version of the libraries doctor knows about (none is imported)."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


# --- versions ---------------------------------------------------------------------------


def check_versions(python: tuple[int, ...], versions: Mapping[str, str]) -> list[Finding]:
    """Python's range, then known-bad combinations among `versions` (see installed_versions)."""
    py = tuple(python[:2])
    shown = ", ".join(f"{name} {version}" for name, version in versions.items())
    findings = [Finding("versions", "ok", f"Python {'.'.join(map(str, python[:3]))}, {shown}")]
    low, high = TESTED_PYTHONS
    tested = f"twotower is tested on {low[0]}.{low[1]} to {high[0]}.{high[1]}"
    if py < low:
        findings.append(
            Finding(
                "python", "fail", f"Python {py[0]}.{py[1]}: too old; {tested}", "upgrade Python"
            )
        )
    elif py > high:
        findings.append(
            Finding(
                "python",
                "warn",
                f"Python {py[0]}.{py[1]}: newer than tested ({tested}); torch and faiss wheels "
                "may lag behind",
                f"use Python {high[0]}.{high[1]} if an import or a run fails",
            )
        )
    else:
        findings.append(Finding("python", "ok", f"Python {py[0]}.{py[1]}: {tested}"))
    numpy = version_tuple(versions.get("numpy", ""))
    if numpy and py >= (3, 13) and numpy < (2, 1):
        findings.append(
            Finding(
                "numpy-python",
                "fail",
                f"numpy {versions['numpy']} on Python 3.13: numpy supports 3.13 from 2.1 on",
                "pip install 'numpy>=2.1'",
            )
        )
    torch = version_tuple(versions.get("torch", ""))
    if numpy >= (2,) and torch and torch < (2, 3):
        findings.append(
            Finding(
                "torch-numpy",
                "warn",
                f"torch {versions['torch']} was built against "
                f"NumPy 1.x and numpy {versions['numpy']} is installed",
                "pip install 'torch>=2.3' (or 'numpy<2'); see the bridge check below",
            )
        )
    faiss = [name for name in versions if name.startswith("faiss")]
    if faiss and torch:
        findings.append(
            Finding(
                "faiss+torch",
                "ok",
                f"{faiss[0]} {versions[faiss[0]]} and torch "
                f"{versions['torch']} are both installed: see the openmp check for whether "
                "they bring two OpenMP runtimes",
            )
        )
    return findings


# --- the OpenMP census ------------------------------------------------------------------


def _bridge_finding(census: Census) -> Finding | None:
    """torch <-> numpy: the NumPy 1.x / 2.x ABI warning on import, or a failing from_numpy."""
    abi = [
        line
        for line in census.warnings + census.stderr.splitlines()
        if "NumPy 1.x" in line or "_ARRAY_API" in line or "Failed to initialize NumPy" in line
    ]
    fix = (
        "install a torch built for your numpy (torch >= 2.3 for numpy 2), or pip install 'numpy<2'"
    )
    if census.bridge not in (None, "ok"):
        return Finding(
            "torch-numpy-bridge", "fail", f"torch.from_numpy failed: {census.bridge}", fix
        )
    if abi:
        return Finding(
            "torch-numpy-bridge", "warn", f"importing torch warned: {abi[0].strip()}", fix
        )
    if census.bridge == "ok":
        return Finding("torch-numpy-bridge", "ok", "torch.from_numpy works with this numpy")
    return None


def check_census(census: Census) -> list[Finding]:
    """Findings of one census: the imports, the torch/numpy bridge, OpenMP runtimes, BLAS."""
    imported = ", ".join(census.imported) or "nothing"
    if census.died is not None:
        return [
            Finding(
                "imports",
                "fail",
                f"a fresh Python that imported {', '.join(MODULES)} "
                f"(each if installed) {census.died}; it had imported: {imported}. "
                f"stderr: {census.stderr.strip()[-300:] or '(empty)'}",
                "the libraries crash when loaded together: " + ISOLATION,
            )
        ]
    findings = [bridge] if (bridge := _bridge_finding(census)) else []
    runtimes = census.distinct_openmp
    details = {"imported": census.imported, "runtimes": [lib.as_dict() for lib in census.openmp]}
    rows = "".join(f"\n{_library_row(lib)}" for lib in census.openmp)
    plural = "s" * (len(runtimes) != 1)
    head = f"{len(runtimes)} OpenMP runtime{plural} loaded after importing {imported}:"
    if len(runtimes) > 1:
        findings.append(Finding("openmp", "warn", head + rows, f"{CLASH}. {ISOLATION}", details))
    else:
        findings.append(Finding("openmp", "ok", head + rows, "", details))
    if census.blas:
        rows = "".join(
            f"\n{_library_row(lib)} ({lib.threading or 'threading unknown'})" for lib in census.blas
        )
        findings.append(
            Finding(
                "blas",
                "ok",
                f"{len(census.blas)} BLAS build{'s' * (len(census.blas) != 1)}, "
                f"each with its own thread pool:{rows}",
                "",
                {"blas": [lib.as_dict() for lib in census.blas]},
            )
        )
    return findings


def _library_row(library: Library) -> str:
    """One census line, in columns: 'libgomp  torch  2 threads  /path/libgomp.so.1'."""
    threads = f"{library.num_threads} thread{'s' * (library.num_threads != 1)}"
    version = f" {library.version}" if library.version else ""
    return f"{library.kind:17s} {library.owner:10s} {threads:10s} {library.path}{version}"


# --- environment variables and engines -------------------------------------------------


def _thread_count_finding(name: str, value: str | None, cpus: int) -> Finding:
    if value is None:
        return Finding(name, "ok", f"unset: libraries pick their own thread count ({cpus} cores)")
    counts = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in counts):
        return Finding(
            name,
            "warn",
            f"{name}={value!r} is not a positive thread count",
            f"set {name} to a number of threads, e.g. {cpus}, or unset it",
        )
    if int(counts[0]) > cpus:
        return Finding(
            name,
            "warn",
            f"{name}={value} asks for more threads than the {cpus} "
            "cores: they compete and each step slows down",
            f"set {name}={cpus} or less",
        )
    return Finding(name, "ok", f"{name}={value} ({cpus} cores)")


def check_environment(environ: Mapping[str, str], cpus: int) -> list[Finding]:
    """The variables that change threading; unset ones are ok (the MPS fallback variable is
    a macOS check: `doctor_platform.check_mps_fallback`)."""
    findings = []
    duplicate = environ.get("KMP_DUPLICATE_LIB_OK")
    if duplicate is not None and duplicate.strip().lower() in TRUE_WORDS:
        findings.append(
            Finding(
                "KMP_DUPLICATE_LIB_OK",
                "warn",
                f"KMP_DUPLICATE_LIB_OK={duplicate}: Intel's "
                "and LLVM's OpenMP no longer stop when a second runtime loads",
                "unset it and see the openmp check: it hides the clash, it does not fix it",
            )
        )
    else:
        shown = "unset" if duplicate is None else f"KMP_DUPLICATE_LIB_OK={duplicate} (not true)"
        findings.append(Finding("KMP_DUPLICATE_LIB_OK", "ok", shown))
    findings += [_thread_count_finding(name, environ.get(name), cpus) for name in THREAD_VARIABLES]
    return findings


def check_wait_policy(environ: Mapping[str, str]) -> Finding:
    """How idle OpenMP threads wait in a run (`process.wait_policy`): spinning ones turn a busy
    machine into stalls."""
    chosen = wait_policy.user_choice(environ)
    if not chosen:
        return Finding(
            "wait-policy",
            "ok",
            "unset: twotower runs with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep)",
        )
    settings = ", ".join(f"{name}={value}" for name, value in chosen.items())
    if chosen.get(wait_policy.POLICY_VARIABLE, "").upper() == "PASSIVE":
        return Finding("wait-policy", "ok", f"{settings}: idle OpenMP threads sleep")
    return Finding(
        "wait-policy",
        "warn",
        f"{settings}: idle OpenMP threads spin, and on a busy machine a spinning thread "
        "takes the time its descheduled partner needs (steps up to 35x slower)",
        "unset it: twotower's default OMP_WAIT_POLICY=PASSIVE costs nothing on a quiet machine",
    )


def check_machine_load(contention: stalls.Contention) -> Finding:
    """Whether other processes crowd the cores now (a one-second `stalls` reading)."""
    reading = contention.describe().replace(" beside this run's 0 threads", "")
    if contention.others >= max(stalls.CROWDED, contention.cores - stalls.CROWDED):
        return Finding(
            "machine-load",
            "warn",
            f"the machine is oversubscribed: {reading} (over 1 s, this check idle)",
            "a run here shares its cores: twotower's OMP_WAIT_POLICY=PASSIVE keeps that "
            "from stalling its steps; if a run's log says it is still slow, give it "
            "--threads 1 or run when the other work is done",
            contention.as_dict(),
        )
    return Finding("machine-load", "ok", reading, "", contention.as_dict())


def check_engines() -> list[Finding]:
    """Which backends and miners this machine can run (registry reasons)."""
    from twotower import backends, miners

    findings = []
    for role, registry in (("backends", backends), ("miners", miners)):
        infos = registry.describe()
        usable = ", ".join(info.name for info in infos if info.available)
        missing = "; ".join(f"{info.name}: {info.reason}" for info in infos if not info.available)
        findings.append(
            Finding(
                role, "ok", f"available: {usable}" + (f" (not here: {missing})" * bool(missing))
            )
        )
    return findings


def check_platform(
    where: Platform, environ: Mapping[str, str], versions: Mapping[str, str]
) -> list[Finding]:
    """What matters on a Mac (each "not applicable here" elsewhere): MPS, Rosetta 2,
    PYTORCH_ENABLE_MPS_FALLBACK, the torch / numpy combination."""
    return [
        check_mps(where),
        check_rosetta(where),
        check_mps_fallback(where, environ),
        check_mac_versions(where, versions),
    ]


# --- all checks, and how they are shown --------------------------------------------------


def diagnose(data: str | None = None, census: Census | None = None) -> list[Finding]:
    """Every check, in the order shown; with `data`, the dataset, memory and disk checks too.

    census: a census already taken (default: take one now, in a fresh child).
    """
    versions = installed_versions()
    cores = usable_cores()
    findings = check_versions(tuple(sys.version_info[:3]), versions)
    findings += check_census(census if census is not None else take_census())
    findings += check_environment(os.environ, cores)
    findings.append(check_wait_policy(os.environ))
    findings.append(check_machine_load(stalls.machine_contention(cores)))
    findings.append(check_threads(cores))
    findings.append(check_memory_pressure(machine_memory()))
    findings += check_engines()
    findings += check_platform(this_platform(), os.environ, versions)
    if data is not None:
        findings += check_data(data)
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when no finding fails, 1 when one does."""
    return 1 if any(finding.status == "fail" for finding in findings) else 0


def to_json(findings: Sequence[Finding]) -> str:
    """{"exit_code", "counts": {status: n}, "findings": [Finding as an object, ...]} as JSON."""
    counts = {status: sum(f.status == status for f in findings) for status in STATUSES}
    document = {
        "exit_code": exit_code(findings),
        "counts": counts,
        "findings": [asdict(finding) for finding in findings],
    }
    return json.dumps(document, indent=2)


def to_text(findings: Sequence[Finding]) -> str:
    """One block per finding: status, check, evidence (continued, indented), '-> what to do'."""
    lines = []
    for finding in findings:
        first, *rest = finding.evidence.splitlines() or [""]
        lines.append(f"{finding.status:6s}{finding.check:21s} {first}")
        lines += [INDENT + line for line in rest]
        if finding.action:
            lines.append(
                textwrap.fill(
                    finding.action,
                    100,
                    initial_indent=INDENT + "-> ",
                    subsequent_indent=INDENT,
                    break_on_hyphens=False,
                )
            )
    counts = ", ".join(f"{sum(f.status == s for f in findings)} {s}" for s in STATUSES)
    lines.append(f"doctor: {len(findings)} checks: {counts}; exit code {exit_code(findings)}")
    return "\n".join(lines)

"""`twotower doctor`: the OpenMP census against our own read of /proc/PID/maps, a compressed
.npz flagged with its cost, no false alarms in a clean environment, --json equal to the text."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.datasets import small_arrays, write_dir, write_npz
from tests.processes import REPO, child_env
from twotower.diagnose.census import Census, classify, take_census
from twotower.diagnose.doctor import check_census, check_environment, check_versions
from twotower.diagnose.doctor_data import check_data

MATTERING = (
    "KMP_DUPLICATE_LIB_OK",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "PYTORCH_ENABLE_MPS_FALLBACK",
)
HAVE_TORCH_AND_FAISS = all(importlib.util.find_spec(name) for name in ("torch", "faiss"))


def start_doctor(*args: str) -> subprocess.Popen[str]:
    """`python -m twotower doctor ARGS` in a child whose environment sets none of MATTERING."""
    env = {k: v for k, v in child_env().items() if k not in MATTERING}
    return subprocess.Popen(
        [sys.executable, "-m", "twotower", "doctor", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a child started by start_doctor."""
    out, err = child.communicate(timeout=300)
    return child.returncode, out, err


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """doctor --data on a good dataset, clean environment: the JSON document and the text."""
    data = write_dir(tmp_path_factory.mktemp("data") / "good", small_arrays())
    both = start_doctor("--data", str(data), "--json"), start_doctor("--data", str(data))
    (code_json, as_json, err_json), (code_text, as_text, err_text) = map(finish, both)
    assert code_json == code_text == 0, err_json + err_text
    return {"json": json.loads(as_json), "text": as_text}


def finding(document: dict[str, Any], check: str) -> dict[str, Any]:
    return next(f for f in document["findings"] if f["check"] == check)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and HAVE_TORCH_AND_FAISS),
    reason="needs Linux with torch and faiss",
)
def test_openmp_runtimes_are_the_ones_proc_maps_shows(clean: dict[str, Any]) -> None:
    # our own read: a child that imports torch and faiss, stopped while we read its maps
    child = subprocess.Popen(
        [sys.executable, "-c", "import numpy, torch, faiss, sys; print(1, flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "1"
        maps = Path(f"/proc/{child.pid}/maps").read_text()
    finally:
        child.communicate("\n", timeout=60)
    seen = {line.split()[-1] for line in maps.splitlines() if re.search(r"/libgomp[^/]*$", line)}
    assert len(seen) >= 1

    openmp = finding(clean["json"], "openmp")
    reported = {r["path"] for r in openmp["details"]["runtimes"] if r["kind"] == "libgomp"}
    assert reported == seen
    assert openmp["status"] == ("warn" if len(seen) > 1 else "ok")
    for path in seen:
        assert path in clean["text"]
    if len(seen) > 1:
        assert "faiss issue 4273" in openmp["action"] and "own worker process" in openmp["action"]


def test_a_clean_environment_has_no_false_alarm(clean: dict[str, Any]) -> None:
    """Only the OpenMP census may warn here: it reports a real second runtime on this machine;
    and the machine's load, when other processes really kept its cores busy meanwhile."""
    alarms = {f["check"]: f["evidence"] for f in clean["json"]["findings"] if f["status"] != "ok"}
    load = finding(clean["json"], "machine-load")
    assert (load["status"] == "warn") == (
        load["details"]["others_cores"] >= max(0.5, load["details"]["cores"] - 0.5)
    )
    assert set(alarms) <= {"openmp", "machine-load"}, alarms
    checks = {f["check"] for f in clean["json"]["findings"]}
    assert {*MATTERING, "versions", "python", "backends", "miners", "mps"} <= checks
    assert {"data", "memory", "disk"} <= checks
    assert clean["json"]["exit_code"] == 0


def test_json_statuses_match_the_text(clean: dict[str, Any]) -> None:
    findings = clean["json"]["findings"]
    shown = [line.split()[:2] for line in clean["text"].splitlines() if not line.startswith(" ")]
    assert shown[:-1] == [[f["status"], f["check"]] for f in findings]
    counts = clean["json"]["counts"]
    assert shown[-1] == ["doctor:", f"{len(findings)}"]
    assert f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail" in clean["text"]


def test_compressed_npz_is_flagged_with_its_cost_and_a_stored_one_is_not(tmp_path: Path) -> None:
    arrays = small_arrays()
    compressed = write_npz(tmp_path / "packed.npz", arrays, compressed=True)
    stored = write_npz(tmp_path / "plain.npz", arrays, compressed=False)
    with zipfile.ZipFile(compressed) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())  # our own count

    flagged = next(f for f in check_data(compressed) if f.check == "npz")
    assert flagged.status == "warn"
    assert flagged.details["unpacked_bytes"] == unpacked
    assert f"{unpacked / 1e9:.3g} GB" in flagged.evidence
    assert "twotower convert" in flagged.action
    assert not compressed.with_name("packed.npz.twotower").exists(), "doctor must not unpack"

    plain = next(f for f in check_data(stored) if f.check == "npz")
    assert plain.status == "ok" and plain.details["compressed"] == []


def test_a_dataset_that_cannot_load_fails_with_exit_code_1(tmp_path: Path) -> None:
    code, out, _ = finish(start_doctor("--data", str(tmp_path / "missing"), "--json"))
    assert code == 1
    assert finding(json.loads(out), "data")["status"] == "fail"


def test_environment_variables_that_change_threading() -> None:
    statuses = {
        f.check: f.status
        for f in check_environment(
            {"KMP_DUPLICATE_LIB_OK": "TRUE", "OMP_NUM_THREADS": "lots", "MKL_NUM_THREADS": "64"},
            cpus=2,
        )
    }
    assert statuses["KMP_DUPLICATE_LIB_OK"] == "warn"
    assert statuses["OMP_NUM_THREADS"] == "warn"  # not a number
    assert statuses["MKL_NUM_THREADS"] == "warn"  # more threads than cores
    assert statuses["OPENBLAS_NUM_THREADS"] == "ok"  # unset
    fine = check_environment({"OMP_NUM_THREADS": "2", "KMP_DUPLICATE_LIB_OK": "FALSE"}, cpus=2)
    assert {f.status for f in fine} == {"ok"}


@pytest.mark.parametrize(
    ("python", "versions", "check", "status"),
    [
        ((3, 13, 0), {"numpy": "2.0.2"}, "numpy-python", "fail"),
        ((3, 13, 0), {"numpy": "2.1.0"}, "python", "ok"),
        ((3, 14, 0), {"numpy": "2.3.0"}, "python", "warn"),
        ((3, 9, 18), {"numpy": "1.26.4"}, "python", "fail"),
        ((3, 11, 7), {"numpy": "2.0.0", "torch": "2.2.2"}, "torch-numpy", "warn"),
        ((3, 11, 7), {"numpy": "2.0.0", "torch": "2.4.0", "faiss-cpu": "1.8"}, "faiss+torch", "ok"),
    ],
)
def test_known_bad_version_combinations(
    python: tuple[int, ...], versions: dict[str, str], check: str, status: str
) -> None:
    findings = {f.check: f.status for f in check_versions(python, versions)}
    assert findings[check] == status
    if status == "ok" and check == "python":
        assert "fail" not in findings.values()


def test_a_census_child_that_crashes_on_import_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "crashy.py").write_text("import ctypes\nctypes.string_at(0)\n")  # a real SIGSEGV
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{REPO}")
    census = take_census(("numpy", "crashy"))
    assert census.died is not None and "SIGSEGV" in census.died and "crashy" in census.died
    assert census.imported.keys() == {"numpy"}
    [failure] = check_census(census)
    assert failure.status == "fail" and failure.check == "imports"


def test_the_macos_clash_is_recognised_from_its_library_paths() -> None:
    """The pools threadpoolctl reports on a Mac (torch's and faiss' own libomp): two
    runtimes, a warning."""
    site = "/Users/me/.venv/lib/python3.12/site-packages"
    pools = [
        pool("openmp", "libomp", f"{site}/torch/lib/libomp.dylib"),
        pool("openmp", "libomp", f"{site}/faiss/.dylibs/libomp.dylib"),
        pool("blas", "libopenblas", f"{site}/numpy/.dylibs/libopenblas64_.0.dylib"),
    ]
    openmp, blas = classify(pools)
    assert [(lib.kind, lib.owner) for lib in openmp] == [("libomp", "torch"), ("libomp", "faiss")]
    assert [(lib.api, lib.owner) for lib in blas] == [("openblas", "numpy")]
    census = Census(imported={"torch": "2.5.1", "faiss": "1.9.0"}, openmp=openmp)
    [warning] = [f for f in check_census(census) if f.check == "openmp"]
    assert warning.status == "warn" and "faiss issue 4273" in warning.action
    one = Census(imported={"torch": "2.5.1"}, openmp=openmp[:1])
    assert {f.status for f in check_census(one)} == {"ok"}


def pool(user_api: str, prefix: str, path: str, threads: int = 8) -> dict[str, Any]:
    """One thread pool as `threadpoolctl.threadpool_info()` describes it."""
    internal = "openmp" if user_api == "openmp" else prefix.removeprefix("lib")
    return {
        "user_api": user_api,
        "internal_api": internal,
        "prefix": prefix,
        "filepath": path,
        "version": None,
        "num_threads": threads,
    }


def shipped_openmp(distribution: str) -> set[str]:
    """Our own list of the OpenMP runtime files a distribution installed (its RECORD)."""
    files = importlib.metadata.files(distribution) or []
    names = ("libgomp", "libomp", "libiomp5", "vcomp")
    return {
        os.path.realpath(file.locate())
        for file in files
        if file.name.lower().startswith(names) and not file.name.endswith(".py")
    }


@pytest.mark.slow  # two fresh interpreters import torch (and faiss)
@pytest.mark.skipif(not HAVE_TORCH_AND_FAISS, reason="needs torch and faiss")
def test_the_census_finds_torchs_and_faiss_openmp_with_their_thread_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each runtime's own default is its core count
    torch_files, faiss_files = shipped_openmp("torch"), shipped_openmp("faiss-cpu")
    if not (torch_files and faiss_files):
        pytest.skip("torch or faiss uses a system OpenMP here (no runtime in its wheel)")
    both = take_census()
    assert both.died is None, both.stderr
    found = {os.path.realpath(lib.path) for lib in both.distinct_openmp}
    assert len(found) == 2 and found & torch_files and found & faiss_files
    assert {lib.num_threads for lib in both.openmp} == {1}

    torch_only = take_census(("numpy", "torch"))
    assert [os.path.realpath(lib.path) for lib in torch_only.distinct_openmp] == sorted(
        found & torch_files
    )
    assert {f.status for f in check_census(torch_only) if f.check == "openmp"} == {"ok"}

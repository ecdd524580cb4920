"""Native frames in crash reports, from real crashes: a segfault injected into the trainer
names the libc function that faulted, a segfault inside a torch kernel under `twotower watch`
names libtorch_cpu and the kernel, a hung trainer shows its native wait; where gdb is missing
the report says so in one line and the core is still deleted. Cores are the child's alone
(RLIMIT_CORE is raised for it, never for the test or a miner worker). Linux with gdb."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import child_env, run_twotower
from twotower import miners
from twotower.data import synthesize
from twotower.process import cores
from twotower.process.cores import CorePlan

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cores and gdb: Linux"),
    pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed"),
]
SMALL_RUN = "--steps 20 --batch-size 16 --hidden 8 --hard-negatives 0 --checkpoint-every 5".split()
# A float tensor over memory that is then made unreadable: torch's sum kernel faults in it.
TORCH_SEGV = """
import ctypes, torch
torch.set_num_threads(1)  # the kernel runs on the main thread, under its callers
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
n = 1 << 20
address = libc.mmap(None, n * 4, 3, 0x22, -1, 0)  # PROT_READ | PROT_WRITE, private anonymous
t = torch.frombuffer((ctypes.c_float * n).from_address(address), dtype=torch.float32)
libc.mprotect(address, n * 4, 0)  # PROT_NONE
print(float(t.sum()))
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=200, bank=200, dim=16, seq_len=6, seed=1)
    return path


def crashed_frames(report: dict) -> list[dict]:
    native = report["native"]
    assert native["note"] is None, native["note"]
    return next(t for t in native["threads"] if t["crashed"])["frames"]


def cores_in(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if re.fullmatch(r"core(\.\d+)?", path.name)]


@pytest.mark.slow
def test_an_injected_segv_names_the_libc_function_that_faulted(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out), "--backend", "numpy", *SMALL_RUN]
    result = run_twotower(*args, cwd=tmp_path, TWOTOWER_INJECT_FAULT="segv@step:7")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "crashes" / "attempt-1.json").read_text())
    frames = crashed_frames(report)
    top = frames[0]  # ctypes.string_at(0): strlen(NULL), in libc (strlen's variant is the CPU's)
    assert "libc.so" in top["library"] and "strlen" in top["symbol"], frames[:3]
    assert any(f["symbol"] and "string_at" in f["symbol"] for f in frames[:4])
    assert isinstance(top["offset"], int) and top["pc"] > 0
    assert report["native"]["core"] == "core deleted after reading"
    assert not cores_in(tmp_path)  # the supervisor's working directory: the core is gone
    assert "native frames (core " in result.stderr and "strlen" in result.stderr
    assert "File " in report["stacks"]  # the Python frames stay


@pytest.mark.slow
@pytest.mark.skipif("faiss" not in miners.available(), reason="faiss is not installed")
def test_a_miner_workers_segfault_has_its_native_frames(dataset: Path, tmp_path: Path) -> None:
    """The trainer raises the core limit of its faiss worker alone; the worker's report (written
    by the trainer, which goes on) reads the worker's core."""
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out), "--backend", "numpy"]
    args += ["--no-supervise", "--steps", "12", "--batch-size", "16", "--hidden", "8"]
    args += ["--hard-negatives", "4", "--mine-every", "10", "--mine-pool", "8"]
    args += ["--miner", "faiss", "--miner-fallback", "exact"]
    # fires once: the refresh used at step 10 is taken at step 8, in the worker
    result = run_twotower(*args, cwd=tmp_path, TWOTOWER_INJECT_FAULT="segv@mine:8")
    assert result.returncode == 0, result.stderr
    (path,) = (out / "crashes").glob("miner-faiss-*.json")
    report = json.loads(path.read_text())
    frames = crashed_frames(report)
    assert "libc.so" in frames[0]["library"] and "strlen" in frames[0]["symbol"], frames[:3]
    assert any("faiss" in image for image in report["native"]["images"])
    assert not cores_in(tmp_path)


@pytest.mark.slow
def test_a_segfault_in_a_torch_kernel_names_libtorch_and_the_kernel(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(TORCH_SEGV)
    watched = tmp_path / "reports"
    result = run_twotower(
        "watch",
        "--out",
        str(watched),
        "--keep-core",
        "--",
        sys.executable,
        str(script),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 128 + 11, result.stderr
    report = json.loads((watched / "run-1.json").read_text())
    frames = crashed_frames(report)
    top = frames[0]
    assert top["library"].endswith(".so") and "libtorch_cpu" in top["library"], frames[:3]
    assert "at::native::" in top["symbol"] and "sum" in top["symbol"], top["symbol"]
    assert any("sum_kernel" in (f["symbol"] or "") for f in frames)  # the kernel, by name
    assert "libtorch_cpu.so  " in result.stderr and "at::native::" in result.stderr
    kept = cores_in(tmp_path)
    assert kept and report["native"]["core"] == f"core kept: {kept[0]} " + (
        "(TWOTOWER_KEEP_CORE=1 / --keep-core)"
    )
    assert any(
        "libgomp" in image or "libtorch_cpu" in image for image in report["native"]["images"]
    )


def test_without_gdb_the_report_says_so_in_one_line_and_the_core_is_deleted(
    tmp_path: Path,
) -> None:
    code = "import ctypes; ctypes.string_at(0)"
    result = run_twotower(
        "watch",
        "--out",
        str(tmp_path / "r"),
        "--",
        sys.executable,
        "-c",
        code,
        cwd=tmp_path,
        timeout=60,
        PATH="/nonexistent",
    )
    assert result.returncode == 128 + 11, result.stderr
    native = json.loads((tmp_path / "r" / "run-1.json").read_text())["native"]
    assert native["note"] == "gdb is not installed (apt install gdb)"
    assert native["threads"] == [] and native["core"] == "core deleted after reading"
    assert not cores_in(tmp_path)
    assert "  native frames: none (gdb is not installed (apt install gdb))\n" in result.stderr
    clean = run_twotower("watch", "--out", str(tmp_path / "r"), "--", sys.executable, "-c", "1")
    assert clean.returncode == 0 and not cores_in(tmp_path)  # a clean exit leaves nothing


@pytest.mark.slow
def test_a_hang_shows_the_native_wait_of_the_hung_thread(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out), "--backend", "numpy", *SMALL_RUN]
    args += ["--hang-timeout", "2"]
    result = run_twotower(*args, cwd=tmp_path, TWOTOWER_INJECT_FAULT="hang@step:7")
    assert result.returncode == 0, result.stderr
    native = json.loads((out / "crashes" / "attempt-1.json").read_text())["native"]
    assert native["note"] is None and native["source"].startswith("gdb attached to pid")
    main = native["threads"][0]  # attached: the main thread first, where Event().wait() sits
    symbols = [frame["symbol"] or "" for frame in main["frames"][:8]]
    assert any(
        re.search(r"futex|sem_(timed)?wait|pthread_cond|nanosleep|pause", s) for s in symbols
    )
    assert any("PyThread_acquire_lock" in s or "acquire" in s for s in symbols), symbols
    assert "native frames (gdb attached to pid" in result.stderr


def test_the_core_pattern_is_read_as_the_kernel_writes_it(tmp_path: Path) -> None:
    plan = CorePlan("file", tmp_path, "core", uses_pid=True)
    assert plan.expected(42, "/usr/bin/python3.11") == "core.42"
    plan = CorePlan("file", tmp_path, "/var/crash/core.%e.%p.%t", uses_pid=True)
    assert plan.expected(42, "/usr/bin/python3.11") == "/var/crash/core.python3.11.42.*"
    assert CorePlan("file", tmp_path, "core.%p").expected(7, "python") == "core.7"
    none = CorePlan(
        "none", tmp_path, note="no core: core_pattern pipes cores to /x, which keeps none"
    )
    assert none.find(7, "python", 0.0) == (None, none.note)
    (tmp_path / "core").write_bytes(b"\x7fELF")  # a core from before the child started
    old = CorePlan("file", tmp_path, "core")
    assert old.find(7, "python", since=(tmp_path / "core").stat().st_mtime + 10)[0] is None


def test_explain_reads_a_linux_core_with_its_program(tmp_path: Path) -> None:
    """A real core (a child allowed one segfaults in ctypes) explained later, as a user would;
    a file that is no core and no report is one line, exit code 2."""
    child = subprocess.run(
        [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"],
        cwd=tmp_path,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (1 << 30, 1 << 30)),
        capture_output=True,
    )
    assert child.returncode == -11
    (core,) = cores_in(tmp_path)
    result = run_twotower("explain", str(core), "--exe", sys.executable, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{core}: {sys.executable} (pid " in result.stdout
    assert "died: SIGSEGV" in result.stdout
    assert re.search(r"#0  libc\.so\.6  \S*strlen\S* \+ \d+", result.stdout), result.stdout
    not_core = tmp_path / "core.txt"
    not_core.write_text("not a core")
    refused = run_twotower("explain", str(not_core), timeout=60)
    assert refused.returncode == 2 and str(not_core) in refused.stderr


def test_the_core_limit_is_raised_for_the_watched_child_alone(tmp_path: Path) -> None:
    """The watched child may dump a core; the process that watches it keeps its own limit."""
    code = (
        "import resource, time; time.sleep(0.5); "
        "print('child', resource.getrlimit(resource.RLIMIT_CORE)[0])"
    )
    watcher = (
        "import resource, sys; from twotower.cli import main; "
        "code = main(['watch', '--out', sys.argv[1], '--', sys.executable, '-c', sys.argv[2]]); "
        "print('watcher', resource.getrlimit(resource.RLIMIT_CORE)[0])"
    )
    before = resource.getrlimit(resource.RLIMIT_CORE)[0]
    result = subprocess.run(
        [sys.executable, "-c", watcher, str(tmp_path / "r"), code],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    child = int(re.search(r"child (\d+)", result.stdout).group(1))
    watcher_limit = int(re.search(r"watcher (\d+)", result.stdout).group(1))
    assert child > 256 << 20  # room for a core (free space less a reserve)
    assert watcher_limit == before  # the watcher's own limit is untouched


def test_a_core_that_a_grandchild_leaves_is_deleted(tmp_path: Path) -> None:
    """The child's children inherit its core limit: a python that a shell runs crashes, the
    shell goes on and exits 0; its core does not stay behind in the working directory."""
    script = f'"{sys.executable}" -c "import ctypes; ctypes.string_at(0)"; true'
    result = run_twotower(
        "watch", "--out", str(tmp_path / "r"), "--", "/bin/sh", "-c", script, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert not cores_in(tmp_path)
    assert "deleted the core" in result.stderr and "a process it started left" in result.stderr


def test_a_pipe_handler_or_no_room_means_no_core_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pattern = tmp_path / "core_pattern"
    monkeypatch.setattr(cores, "PATTERN_FILE", pattern)
    pattern.write_text("|/usr/share/apport/apport -p%p -s%s -c%c -d%d -P%P -u%u -g%g -- %E\n")
    apport = CorePlan.prepare(tmp_path)
    assert apport.kind == "none" and apport.limit == 0
    assert apport.note == (
        "no core: core_pattern pipes cores to /usr/share/apport/apport, which keeps none for us"
    )
    assert apport.allow(os.getpid()) is None  # nothing is raised
    pattern.write_text("core\n")
    monkeypatch.setattr(cores, "MIN_FREE", 1 << 62)  # more room than any disk has
    full = CorePlan.prepare(tmp_path)
    assert full.kind == "none" and full.note.startswith("no core: ") and "MiB free in" in full.note
    monkeypatch.setattr(cores, "MIN_FREE", 0)
    assert CorePlan.prepare(tmp_path).kind == "file"

"""`twotower explain`: macOS .ips crash reports (fixtures in Apple's macOS 12+ format under
tests/fixtures/ips/), twotower crash reports and run directories, explained with the known
crashes of `twotower.diagnose.known_crashes`. Every row of that table is shown by one fixture
and must not match the others (each test's negative control); bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.processes import run_twotower
from twotower.diagnose import ips
from twotower.diagnose.crash_text import read_crash_text
from twotower.diagnose.explain import explain
from twotower.diagnose.known_crashes import KNOWN_CRASHES, matching
from twotower.diagnose.native_crash import from_report
from twotower.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures" / "ips"
TEXT = Path(__file__).parent / "fixtures" / "crash"
EXPECTED = {  # fixture -> the rows it must match, and no other
    "openmp-two-runtimes.ips": {"two-openmp-runtimes"},
    "mps-ndarray-4gib.ips": {"mps-ndarray-over-4gib"},
    "mpsgraph-assertion.ips": {"mpsgraph-failure"},
    "accelerate-sigbus.ips": {"accelerate-blas-misaligned"},
    "faiss-terminate.ips": {"faiss-exception-terminates"},
    "torch-gru-segv.ips": {"torch-rnn-kernel"},
    "torch-sum-segv.ips": set(),  # a segfault in a torch kernel that no row knows
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_fixture_matches_its_row_and_no_other(name: str) -> None:
    crash = ips.read_ips(FIXTURES / name)
    assert crash.frames and crash.signal in ("SIGSEGV", "SIGBUS", "SIGABRT")
    assert {row.name for row, _ in matching(crash)} == EXPECTED[name]


def test_every_row_is_shown_by_a_fixture_and_refused_by_the_others() -> None:
    shown = {row for rows in EXPECTED.values() for row in rows}
    assert shown == {row.name for row in KNOWN_CRASHES}
    for row in KNOWN_CRASHES:
        refused = [name for name, rows in EXPECTED.items() if row.name not in rows]
        assert len(refused) >= 5, row.name
        assert row.issues and all(url.startswith("https://github.com/") for url in row.issues)


def test_an_ips_is_read_as_apple_writes_it() -> None:
    crash = ips.read_ips(FIXTURES / "openmp-two-runtimes.ips")
    assert (crash.process, crash.pid, crash.signal) == ("Python", 40211, "SIGSEGV")
    assert crash.exception == "EXC_BAD_ACCESS (KERN_INVALID_ADDRESS at 0x0000000000000008)"
    assert crash.thread == "thread 2" and crash.threads == 3  # faultingThread indexes threads
    top = crash.frames[0]
    assert top.image == "libomp.dylib" and top.symbol.startswith("void __kmp_suspend_64")
    assert top.offset == 44  # symbolLocation
    assert sum(name == "libomp.dylib" for name in crash.image_names()) == 2
    mps = ips.read_ips(FIXTURES / "mps-ndarray-4gib.ips")
    assert mps.messages[0].startswith("libsystem_c.dylib: ")
    assert "total bytes of NDArray > 2**32" in mps.messages[0]


def test_explain_prints_what_died_the_frames_and_the_fitting_causes() -> None:
    result = run_twotower("explain", str(FIXTURES / "mps-ndarray-4gib.ips"), timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "died: EXC_CRASH, SIGABRT; Abort trap: 6" in out
    assert "failed assertion `[MPSNDArray initWithDevice" in out
    assert "#6  MPSNDArray  -[MPSNDArray initWithDevice:descriptor:isTextureBacked:] + 1400" in out
    assert "mps-ndarray-over-4gib: an MPS tensor over 2**32 bytes" in out
    assert "https://github.com/pytorch/pytorch/issues/143859" in out
    assert "mpsgraph-failure" not in out
    plain = explain(FIXTURES / "torch-sum-segv.ips")
    assert "libtorch_cpu.dylib  void at::native::" in plain
    assert "known causes: none of the table's rows fit" in plain


def test_text_reports_old_and_translated_are_read_too(tmp_path: Path) -> None:
    """A macOS 11 `.crash` and the "Translated Report" text of macOS 12+ (what users paste)."""
    old = read_crash_text(TEXT / "faiss-terminate-11.crash")
    assert (old.process, old.pid, old.signal) == ("Python", 2211, "SIGABRT")
    assert old.frames[6].image == "_swigfaiss.so" and old.frames[6].offset == 4011
    assert old.frames[7].symbol is None and old.frames[7].offset == 3395777  # unsymbolicated
    assert old.messages[0].startswith("libc++abi: terminating with uncaught exception")
    assert [row.name for row, _ in matching(old)] == ["faiss-exception-terminates"]
    pasted = tmp_path / "report.txt"  # no suffix to go by: the text itself is recognised
    pasted.write_bytes((TEXT / "openmp-translated.crash").read_bytes())
    text = explain(pasted)
    assert "died: EXC_BAD_ACCESS (0x0000000000000001, 0x0000000000000008), SIGSEGV" in text
    assert "faulting thread (thread 3 of 4 threads)" in text
    assert "#0  libomp.dylib  void __kmp_suspend_64<false, true>" in text
    assert "two-openmp-runtimes" in text and "faiss-exception-terminates" not in text
    broken = tmp_path / "broken.crash"
    broken.write_text("Process:  Python [1]\nException Type:  EXC_CRASH (SIGABRT)\n")
    with pytest.raises(
        UsageError, match="broken.crash: no 'Exception Type' and 'Thread N Crashed'"
    ):
        explain(broken)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("truncated.ips", "not JSON where an .ips has it"),
        ("jetsam.ips", "bug_type 298, not a crash"),
        ("missing.ips", "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(name: str, problem: str) -> None:
    result = run_twotower("explain", str(FIXTURES / name), timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(FIXTURES / name) in result.stderr and problem in result.stderr


def test_a_json_that_is_no_crash_report_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "config.json"
    other.write_text('{"steps": 3}')
    with pytest.raises(UsageError, match="config.json: not a twotower crash report"):
        explain(other)


def test_latest_takes_the_newest_python_report(tmp_path: Path) -> None:
    folder = tmp_path / "Library" / "Logs" / "DiagnosticReports"
    folder.mkdir(parents=True)
    for age, name in ((100, "torch-gru-segv.ips"), (0, "accelerate-sigbus.ips")):
        copy = folder / f"Python-2026-11-30-1402{age // 100}.ips"
        copy.write_bytes((FIXTURES / name).read_bytes())
        os.utime(copy, (time.time() - age, time.time() - age))
    (folder / "Other-2026-11-30.ips").write_bytes(
        (FIXTURES / "mpsgraph-assertion.ips").read_bytes()
    )
    assert "accelerate-blas-misaligned" in explain(latest=True, folder=folder)
    result = run_twotower("explain", "--latest", timeout=60, HOME=str(tmp_path / "nobody"))
    assert result.returncode == 2 and "--latest: no crash reports folder" in result.stderr


def native_report(frames: list[tuple[str, str]], openmp: list[str], stderr: str = "") -> dict:
    """A twotower crash report with a "native" section, as guard/ writes one."""
    return {
        "label": "attempt 1",
        "pid": 7,
        "command": ["python", "-m", "twotower", "train"],
        "exit": {"returncode": -11, "signal": "SIGSEGV", "description": "killed by SIGSEGV"},
        "where": {"phase": "step", "step": 450},
        "openmp": openmp,
        "stderr_tail": stderr,
        "native": {
            "source": "core",
            "threads": [
                {"name": "LWP 8", "crashed": False, "frames": []},
                {
                    "name": "LWP 7",
                    "crashed": True,
                    "frames": [
                        {"library": lib, "symbol": sym, "offset": 4, "pc": 4096}
                        for lib, sym in frames
                    ],
                },
            ],
        },
        "causes": [{"confidence": "possible", "cause": "a native crash", "mitigation": "see"}],
    }


def test_a_twotower_report_and_its_run_directory_are_explained(tmp_path: Path) -> None:
    gomp = ["/venv/torch/lib/libgomp.so.1", "/venv/faiss_cpu.libs/libgomp-e985bcbb.so.1.0.0"]
    clash = native_report([("libgomp.so.1", "__kmp_wait_template"), ("python", "main")], gomp)
    crash = from_report(clash)
    assert crash.frames[0].symbol == "__kmp_wait_template" and crash.signal == "SIGSEGV"
    assert [row.name for row, _ in matching(crash)] == ["two-openmp-runtimes"]
    one = native_report([("libtorch_cpu.so", "at::native::sum_kernel_impl")], gomp[:1])
    assert matching(from_report(one)) == []  # negative control: one runtime, no OMP error
    one["stderr_tail"] = "OMP: Error #15: Initializing libiomp5.so, but found libgomp.so.1"
    assert [row.name for row, _ in matching(from_report(one))] == ["two-openmp-runtimes"]
    crashes = tmp_path / "run" / "crashes"
    crashes.mkdir(parents=True)
    (crashes / "attempt-1.json").write_text(json.dumps(one))
    os.utime(crashes / "attempt-1.json", (time.time() - 60, time.time() - 60))
    (crashes / "attempt-2.json").write_text(json.dumps(clash))
    (tmp_path / "run" / "heartbeat.json").write_text('{"phase": "step"}')  # newer, no report
    text = explain(tmp_path / "run")
    assert "attempt-2.json: attempt 1 (pid 7)" in text
    assert "#0  libgomp.so.1  __kmp_wait_template + 4" in text
    assert "two-openmp-runtimes" in text and "in phase step at step 450" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no crash report in it"):
        explain(empty)


def test_a_hang_report_shows_the_main_threads_wait_and_no_crash_row(tmp_path: Path) -> None:
    """Stacks taken at a hang (gdb attached, nothing crashed) are shown, but no known crash is
    inferred from them: an idle OpenMP thread waits in __kmp_* with one runtime or two."""
    gomp = ["/venv/torch/lib/libgomp.so.1", "/venv/faiss_cpu.libs/libgomp-e985bcbb.so.1.0.0"]
    hang = native_report([("libgomp.so.1", "__kmp_wait_template"), ("libc.so.6", "futex")], gomp)
    hang["exit"] = {"returncode": -9, "signal": "SIGKILL", "description": "killed by SIGKILL"}
    hang["native"]["source"] = "gdb attached to pid 7"
    hang["native"]["threads"] = [{**hang["native"]["threads"][1], "crashed": False}]
    path = tmp_path / "attempt-1.json"
    path.write_text(json.dumps(hang))
    text = explain(path)
    assert "main thread at the hang (LWP 7 of 1 threads), innermost first:" in text
    assert "#0  libgomp.so.1  __kmp_wait_template + 4" in text
    assert "known causes: none of the table's rows fit" in text
    assert "written before twotower kept native frames" not in text

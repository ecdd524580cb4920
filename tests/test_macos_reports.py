"""macOS, live: when a watched process dies by a signal, the .ips the crash reporter writes for
its pid is waited for (bounded) and folded into the report. Tested on Linux by naming the
reports folder ($TWOTOWER_CRASH_REPORTS, or NativeWatch's `reports`): a real child writes an
Apple-format report with its own pid there, as the crash reporter would, then segfaults."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.processes import run_twotower
from twotower.guard.native import NativeWatch
from twotower.guard.native_report import native_summary

FIXTURES = Path(__file__).parent / "fixtures" / "ips"
REPORTER = """
import ctypes, json, os, sys
header, body = open(sys.argv[1]).read().split("\\n", 1)
body = json.loads(body)
body["pid"] = os.getpid()
with open(os.path.join(sys.argv[2], "Python-2026-11-30-140211.ips"), "w") as out:
    out.write(header + "\\n" + json.dumps(body, indent=2))
ctypes.string_at(0)
"""


def test_the_crash_report_of_the_dead_pid_is_folded_into_the_report(tmp_path: Path) -> None:
    reports = tmp_path / "DiagnosticReports"
    reports.mkdir()
    other = json.loads((FIXTURES / "mps-ndarray-4gib.ips").read_text().split("\n", 1)[1])
    assert other["pid"] != 0  # another process's report, there before: never chosen
    (reports / "Python-2026-11-30-120000.ips").write_bytes(
        (FIXTURES / "mps-ndarray-4gib.ips").read_bytes()
    )
    fixture = str(FIXTURES / "openmp-two-runtimes.ips")
    result = run_twotower(
        "watch",
        "--out",
        str(tmp_path / "w"),
        "--",
        sys.executable,
        "-c",
        REPORTER,
        fixture,
        str(reports),
        cwd=tmp_path,
        timeout=60,
        TWOTOWER_CRASH_REPORTS=str(reports),
    )
    assert result.returncode == 128 + 11, result.stderr
    report = json.loads((tmp_path / "w" / "run-1.json").read_text())
    native = report["native"]
    assert (
        native["source"].endswith("Python-2026-11-30-140211.ips") and native["pid"] == report["pid"]
    )
    assert native["exception"] == "EXC_BAD_ACCESS (KERN_INVALID_ADDRESS at 0x0000000000000008)"
    assert native["threads"][0]["frames"][0]["symbol"].startswith("void __kmp_suspend_64")
    assert any("two-openmp-runtimes" in cause["cause"] for cause in report["causes"])
    assert "libomp.dylib  void __kmp_suspend_64" in result.stderr


def test_no_report_for_the_pid_in_time_is_one_line(tmp_path: Path) -> None:
    reports = tmp_path / "DiagnosticReports"
    reports.mkdir()
    (reports / "Python-old.ips").write_bytes((FIXTURES / "torch-gru-segv.ips").read_bytes())
    watch = NativeWatch(tmp_path, reports=reports, ips_wait=0.5)
    watch.started = 0.0  # the fixture's file is recent enough: only its pid rules it out
    started = time.monotonic()
    assert watch.from_crash_report(12345) is None
    assert time.monotonic() - started < 5  # the wait is bounded
    found = watch.from_crash_report(43020)  # the fixture's own pid
    assert found is not None and found["threads"][0]["crashed"]
    assert any("torch-rnn-kernel" in line for line in found["explain"])
    lines = native_summary(found)
    assert lines[0].startswith("  native frames (macOS crash report ")
    assert "libtorch_cpu.dylib  at::native::(anonymous namespace)::GRUCell" in lines[1]

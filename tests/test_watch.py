"""`twotower watch -- COMMAND...` on real crashing children: a ctypes segfault and a SIGKILL are
named in the report, a Python exception's traceback is kept, exit codes pass through (128 + N
for signal N), and a clean exit writes no report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.processes import run_twotower


def watch(out: Path, code: str):
    """`twotower watch --out OUT -- python -c CODE` in a child without PYTHONUNBUFFERED."""
    return run_twotower("watch", "--out", str(out), "--", sys.executable, "-c", code, timeout=60)


def report(out: Path, number: int = 1) -> dict:
    return json.loads((out / f"run-{number}.json").read_text())


def test_a_segfault_is_named_with_its_traceback(tmp_path: Path) -> None:
    result = watch(
        tmp_path, "import ctypes, sys; print('before', file=sys.stderr); ctypes.string_at(0)"
    )
    assert result.returncode == 128 + 11, result.stderr
    found = report(tmp_path)
    assert found["exit"]["signal"] == "SIGSEGV" and found["where"] is None
    assert "Segmentation fault" in found["stacks"] and "string_at" in found["stacks"]
    assert "killed by SIGSEGV" in result.stderr and "report:" in result.stderr
    assert "before" in result.stderr  # the child's stderr passes through ...
    assert "before" in (tmp_path / "run-1.stderr.txt").read_text()  # ... and is kept


def test_a_sigkill_is_named(tmp_path: Path) -> None:
    result = watch(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert result.returncode == 128 + 9, result.stderr
    found = report(tmp_path)
    assert found["exit"]["signal"] == "SIGKILL"
    assert found["causes"][0]["cause"].startswith(("killed from outside", "memory pressure"))
    assert found["memory"]["limit_kb"] and found["memory"]["peak_rss_kb"]


def test_exit_codes_pass_through_and_exceptions_keep_their_traceback(tmp_path: Path) -> None:
    assert watch(tmp_path, "print('fine')").returncode == 0
    assert not list(tmp_path.glob("*.json"))  # a clean exit is no crash
    failed = watch(tmp_path, "1 / 0")
    assert failed.returncode == 1
    found = report(tmp_path, 2)  # numbering goes on from the clean run's stderr copy
    assert found["python_traceback"].endswith("ZeroDivisionError: division by zero")
    assert found["causes"][0]["cause"] == "a Python exception: ZeroDivisionError: division by zero"
    assert watch(tmp_path, "import sys; sys.exit(7)").returncode == 7


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_twotower("watch", "--out", str(tmp_path))
    assert result.returncode == 2 and "give the command after --" in result.stderr
    missing = run_twotower("watch", "--out", str(tmp_path), "--", "no-such-command-here")
    assert missing.returncode == 2 and "cannot run no-such-command-here" in missing.stderr


def test_a_shell_wrapping_python_is_measured_with_its_python(tmp_path: Path) -> None:
    """The sampled RSS covers the processes the command starts: 64 MiB held by the python
    that a shell runs shows in the report's trend (the shell alone holds a few MiB:
    tests/test_memory.py::test_a_process_tree_sums_its_descendants)."""
    python = "import time; b = bytearray(64 << 20); b[::4096] = b'1' * (len(b) // 4096); "
    python += "time.sleep(3)"
    script = f'"{sys.executable}" -c "{python}"; kill -9 $$'
    result = run_twotower("watch", "--out", str(tmp_path), "--", "/bin/sh", "-c", script)
    assert result.returncode == 128 + 9, result.stderr
    found = report(tmp_path)
    assert found["memory"]["peak_sampled_kb"] >= 64 * 1024, found["memory"]

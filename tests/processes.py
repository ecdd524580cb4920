"""Running twotower in child processes the way a user's machine would: no PYTHONUNBUFFERED;
`run_measured`: a snippet's memory growth in a fresh Python with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONUNBUFFERED and any armed fault, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONUNBUFFERED", "TWOTOWER_INJECT_FAULT")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_twotower(
    *args: str, timeout: float = 300, cwd: Path = REPO, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m twotower ARGS` in a child started in `cwd`; returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "twotower", *args],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def signal_after_steps(
    run: Path, signum: int, steps: int, *args: str, cwd: Path = REPO, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Start `python -m twotower ARGS` in `cwd`, send it `signum` (a real signal, as Ctrl-C
    or a scheduler sends) once RUN/metrics.jsonl holds `steps` step records, and wait."""
    from twotower.run.rundir import read_metrics

    def logged() -> int:
        if not (run / "metrics.jsonl").exists():
            return 0
        return sum(record["event"] == "step" for record in read_metrics(run / "metrics.jsonl"))

    child = subprocess.Popen(
        [sys.executable, "-m", "twotower", *args],
        env=child_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while logged() < steps and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signum)
    out, err = child.communicate(timeout=timeout)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def train_in_child(
    data: Path, out: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`twotower train --data DATA --out OUT ARGS` in a child, `env` added to its environment."""
    return run_twotower("train", "--data", str(data), "--out", str(out), *args, **env)


MEASURED = """
import json, os, sys
import numpy as np
from twotower.data import load_dataset, synthesize

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

before = rss_anon()
{body}
report["growth"] = rss_anon() - before
report["unbuffered"] = "PYTHONUNBUFFERED" in os.environ
print(json.dumps(report))
"""


def run_measured(body: str, path: Path, home: Path) -> dict:
    """Run `body` (which sets `report`, a dict; sys.argv[1] is `path`) in a fresh Python
    with a clean environment, as on a user's machine (no PYTHONUNBUFFERED).

    Returns `report` plus "growth": how much RssAnon (heap, not file-backed pages) grew.
    """
    result = subprocess.run(
        [sys.executable, "-c", MEASURED.format(body=textwrap.dedent(body)), str(path)],
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert not report["unbuffered"]
    return report

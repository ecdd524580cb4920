"""Running twotower in child processes the way a user's machine would: no PYTHONUNBUFFERED."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_twotower(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m twotower ARGS` in a child; returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "twotower", *args],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def train_in_child(
    data: Path, out: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`twotower train --data DATA --out OUT ARGS` in a child, `env` added to its environment."""
    return run_twotower("train", "--data", str(data), "--out", str(out), *args, **env)

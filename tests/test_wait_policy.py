"""OpenMP's wait policy: twotower's PASSIVE reaches the runtime of the trainer (supervised or
not) and of its miner worker, as each runtime reports it (OMP_DISPLAY_ENV=true makes GNU
OpenMP print its settings when it loads); a user's own setting wins."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.processes import child_env, train_in_child
from twotower import backends, miners
from twotower.data import synthesize
from twotower.process import wait_policy
from twotower.process.openmp import openmp_runtimes

pytestmark = pytest.mark.skipif(
    "torch-cpu" not in backends.available(), reason="needs torch (an OpenMP runtime)"
)
REPORTED = re.compile(r"OMP_WAIT_POLICY = '(\w+)'")
RUN = "--backend torch-cpu --hidden 16 --steps 4 --max-eval 20".split()


def reported_policies(stderr: str) -> list[str]:
    """The wait policy each GNU OpenMP runtime printed as it loaded."""
    return REPORTED.findall(stderr)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=200, bank=150, dim=16, seq_len=5, seed=4)
    return path


@pytest.fixture(autouse=True)
def no_user_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The children start from an environment where nobody chose a wait policy."""
    for name in (*wait_policy.USER_CHOICES, wait_policy.SET_BY_TWOTOWER):
        monkeypatch.delenv(name, raising=False)


def gnu_openmp() -> bool:
    """Whether torch here runs on GNU OpenMP (the runtime that OMP_DISPLAY_ENV is read from)."""
    import torch  # noqa: F401  (loads its OpenMP in this test process only)

    return any("libgomp" in path for path in openmp_runtimes())


@pytest.mark.parametrize("supervised", [False, True])
def test_the_trainers_openmp_sleeps_when_idle(
    small_data: Path, tmp_path: Path, supervised: bool
) -> None:
    if not gnu_openmp():
        pytest.skip("OMP_DISPLAY_ENV is read from GNU OpenMP here")
    mode = [] if supervised else ["--no-supervise"]
    done = train_in_child(small_data, tmp_path / "run", *RUN, *mode, OMP_DISPLAY_ENV="true")
    assert done.returncode == 0, done.stderr
    assert reported_policies(done.stderr) and set(reported_policies(done.stderr)) == {"PASSIVE"}
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "threads wait: OMP_WAIT_POLICY=PASSIVE (twotower's default" in log


def test_a_users_own_setting_wins(small_data: Path, tmp_path: Path) -> None:
    """The negative control: the same run with OMP_WAIT_POLICY=ACTIVE in the user's
    environment keeps it (and says it is theirs)."""
    if not gnu_openmp():
        pytest.skip("OMP_DISPLAY_ENV is read from GNU OpenMP here")
    args = [*RUN, "--no-supervise"]
    env = {"OMP_DISPLAY_ENV": "true", "OMP_WAIT_POLICY": "ACTIVE"}
    done = train_in_child(small_data, tmp_path / "run", *args, **env)
    assert done.returncode == 0, done.stderr
    assert set(reported_policies(done.stderr)) == {"ACTIVE"}
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "threads wait: OMP_WAIT_POLICY=ACTIVE (yours)" in log


@pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")
def test_the_miner_worker_sleeps_too(small_data: Path, tmp_path: Path) -> None:
    """faiss' OpenMP in the worker process reports PASSIVE as well: two runtimes load in two
    processes (torch's in the trainer, faiss' in its worker), each printing its settings."""
    if not gnu_openmp():
        pytest.skip("OMP_DISPLAY_ENV is read from GNU OpenMP here")
    args = [*RUN, "--no-supervise", "--miner", "faiss", "--miner-isolation", "process"]
    args += ["--hard-negatives", "2", "--mine-every", "2"]
    done = train_in_child(small_data, tmp_path / "run", *args, OMP_DISPLAY_ENV="true")
    assert done.returncode == 0, done.stderr
    policies = reported_policies(done.stderr)
    assert len(policies) >= 2 and set(policies) == {"PASSIVE"}, done.stderr[-2000:]


@pytest.mark.parametrize("variable", wait_policy.USER_CHOICES)
def test_a_child_environment_keeps_any_user_choice(variable: str) -> None:
    mine = wait_policy.child_env({variable: "7"})
    assert mine == {variable: "7"}  # nothing added beside a user's choice
    ours = wait_policy.child_env(child_env())
    assert ours[wait_policy.POLICY_VARIABLE] == "PASSIVE"
    assert wait_policy.user_choice(ours) == {}  # twotower's, not the user's
    assert wait_policy.user_choice(dict(os.environ, **{variable: "7"})) == {variable: "7"}

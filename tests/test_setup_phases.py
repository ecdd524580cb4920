"""Long set-up is visible and never mistaken for a hang; a set-up crash names its phase and
blames the right engine; a miner option that cannot work is refused before anything is written.

Real builds, real faults (TWOTOWER_INJECT_FAULT in the worker or the trainer), children started
without PYTHONUNBUFFERED and without a terminal, as a user's would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import twotower
from tests.processes import run_twotower
from tests.runs import tiny_config
from twotower import miners
from twotower.data import synthesize
from twotower.errors import UsageError
from twotower.run.rundir import read_metrics

pytestmark = pytest.mark.skipif("faiss" not in miners.available(), reason="needs faiss")

SMALL_RUN = (
    "--backend numpy --steps 12 --batch-size 8 --hidden 8 --hard-negatives 3 --mine-every 6 "
    "--mine-pool 6 --queue-size 16 --checkpoint-every 6 --max-eval 40 --max-restarts 3"
).split()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 bank rows of dimension 16."""
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=300, bank=3000, dim=16, seq_len=5, seed=2)
    return path


def train(data: Path, out: Path, *args: str, **env: str):
    """`twotower train` (supervised unless args say otherwise) with its own index cache."""
    env.setdefault("TWOTOWER_CACHE", str(out.parent / "cache"))
    return run_twotower("train", "--data", str(data), "--out", str(out), *SMALL_RUN, *args, **env)


def events(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == name]


def reports(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "crashes").glob("attempt-*.json"))]


@pytest.mark.slow
def test_a_build_longer_than_the_hang_timeout_is_not_a_hang(tmp_path: Path) -> None:
    """A real faiss IVF build (k-means, one native call with no progress of its own), kept
    busy in the worker for at least 6 s (TWOTOWER_TEST_MIN_BUILD_SECONDS: CPU work and no
    progress messages, as on a slower machine), under a 1.5 s watchdog: the worker's CPU time
    keeps the trainer's heartbeat moving, so the build completes and the run exits 0."""
    data = tmp_path / "data"
    synthesize(data, samples=200, bank=20_000, dim=32, seq_len=4, seed=3)
    out = tmp_path / "run"
    args = ("--miner", "faiss", "--faiss-index", "IVF256,Flat", "--faiss-nprobe", "8")
    result = train(data, out, *args, "--hang-timeout", "1.5", TWOTOWER_TEST_MIN_BUILD_SECONDS="6")
    assert result.returncode == 0, result.stderr
    assert not reports(out) and not events(out, "restart")
    log = (out / "log.txt").read_text()
    announced = "build-index: faiss IVF256,Flat over 20,000 x 32 bank rows"
    assert announced in log and announced in result.stderr  # stderr without a terminal
    assert "train-index: k-means of IVF256,Flat on 10,240 sampled rows" in log  # 40 per list
    (start,) = events(out, "start")
    assert start["miner_build"]["params"] == {"nlist": 256, "nprobe": 8}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "phase", "lead"),
    [
        ("hang@build-index:0", "build-index", "0"),
        ("hang@mine:6", "mine", "0"),  # taken and awaited at 6
        ("hang@mine:4", "mine", "2"),  # searched beside step 4 and 5, awaited at 6
    ],
)
def test_a_hang_in_the_miner_worker_is_still_caught(
    small: Path, tmp_path: Path, fault: str, phase: str, lead: str
) -> None:
    """A stall in the worker uses no CPU: the watchdog kills the trainer (and its worker),
    the report names the phase and the fault, and the restarted run finishes; a stall of a
    search running beside training too, once training waits for it."""
    out = tmp_path / "run"
    args = ("--miner", "faiss", "--faiss-index", "IVF16,Flat", "--hang-timeout", "2")
    args += ("--mine-lead", lead)
    result = train(small, out, *args, TWOTOWER_INJECT_FAULT=fault)
    assert result.returncode == 0, result.stderr
    (found,) = reports(out)
    assert found["watchdog"] is not None and found["exit"]["signal"] == "SIGKILL"
    assert found["where"]["phase"] == phase and found["where"]["miner"] == "faiss"
    assert found["causes"][0]["cause"] == f"injected fault {fault}"
    (restart,) = events(out, "restart")
    assert (restart["backend"], restart["miner"]) == ("numpy", "faiss")


def test_a_setup_crash_names_its_phase(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(small, out, TWOTOWER_INJECT_FAULT="segv@load:0")
    assert result.returncode == 0, result.stderr
    (found,) = reports(out)
    assert found["exit"]["signal"] == "SIGSEGV"
    assert (found["where"]["phase"], found["where"]["step"]) == ("load", 0)
    assert "killed by SIGSEGV (segmentation fault" in result.stderr
    assert "in phase load at step 0" in result.stderr and "phase None" not in result.stderr


@pytest.mark.slow
def test_an_in_process_miner_that_crashes_in_its_build_is_switched_not_the_backend(
    small: Path, tmp_path: Path
) -> None:
    """faiss in the trainer's process segfaults in every build: the trainer dies in phase
    build-index; the second time the supervisor moves down --miner-fallback, never --fallback."""
    out = tmp_path / "run"
    args = ("--miner", "faiss", "--faiss-index", "IVF16,Flat", "--miner-isolation", "none")
    result = train(small, out, *args, TWOTOWER_INJECT_FAULT="segv@build-index:0:faiss")
    assert result.returncode == 0, result.stderr
    first, second = reports(out)
    for found in (first, second):
        assert (found["where"]["phase"], found["where"]["miner"]) == ("build-index", "faiss")
        assert any("while building its index" in c["cause"] for c in found["causes"])
    (switch,) = events(out, "switch")
    assert (switch["role"], switch["previous"], switch["to"]) == ("miner", "faiss", "exact")
    (*_, last_start) = events(out, "start")
    assert (last_start["backend"], last_start["miner"]) == ("numpy", "exact")


def test_an_isolated_miner_that_crashes_in_its_build_is_replaced_without_a_crash(
    small: Path, tmp_path: Path
) -> None:
    """The same fault in a worker costs the worker: restart, then exact; the trainer lives."""
    out = tmp_path / "run"
    args = ("--miner", "faiss", "--faiss-index", "IVF16,Flat")
    result = train(small, out, *args, TWOTOWER_INJECT_FAULT="segv@build-index:0:faiss")
    assert result.returncode == 0, result.stderr
    assert not reports(out)
    crashes = events(out, "miner-crash")
    assert len(crashes) == 2 and all("SIGSEGV" in c["how"] for c in crashes)
    (switch,) = events(out, "miner-switch")
    assert (switch["previous"], switch["miner"]) == ("faiss", "exact")
    (start,) = events(out, "start")
    assert (start["backend"], start["miner"]) == ("numpy", "exact")


@pytest.mark.parametrize("supervise", [True, False], ids=["supervised", "in-process"])
def test_an_ivf_with_more_lists_than_rows_is_refused_before_anything_is_written(
    small: Path, tmp_path: Path, supervise: bool
) -> None:
    out = tmp_path / "run"
    extra = () if supervise else ("--no-supervise",)
    result = train(small, out, "--miner", "faiss", "--faiss-index", "IVF99999,Flat", *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the bank has 3,000" in lines[0] and "--faiss-index IVF64,Flat" in lines[0]
    assert not out.exists()  # the supervisor removes its own files of a refused fresh run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--faiss-index", "HNSW16", "--faiss-nprobe", "4"), "has no nprobe parameter"),
        (("--faiss-index", "IVF16,Flat", "--faiss-ef-search", "4"), "has no efSearch parameter"),
        (("--faiss-index", "Flat", "--faiss-nprobe", "4"), "it has no --faiss-nprobe"),
        (("--faiss-index", "IVF16,Banana"), "faiss cannot make this index"),
        (("--faiss-index", "IVF64,Flat", "--faiss-train-rows", "10"), "fewer than the 64 IVF"),
    ],
    ids=["nprobe-on-hnsw", "efsearch-on-ivf", "nprobe-on-flat", "unparsable", "train-rows"],
)
def test_options_the_index_cannot_take_are_refused_up_front(
    small: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    out = tmp_path / "run"
    result = train(small, out, "--no-supervise", "--miner", "faiss", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize(
    ("miner", "settings", "expected"),
    [
        (
            "faiss",
            {"faiss_index": "HNSW16", "faiss_ef_search": 77, "faiss_ef_construction": 33},
            {"M": 16, "efSearch": 77, "efConstruction": 33},
        ),
        ("faiss", {"faiss_index": "IVF32,Flat", "faiss_nprobe": 7}, {"nlist": 32, "nprobe": 7}),
        (
            "hnswlib",
            {"hnswlib_m": 8, "hnswlib_ef_construction": 50, "hnswlib_ef": 60},
            {"M": 8, "ef_construction": 50, "ef": 60},
        ),
    ],
    ids=["faiss-hnsw", "faiss-ivf", "hnswlib"],
)
def test_tuning_flags_reach_the_index_in_the_worker(
    small: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    miner: str,
    settings: dict,
    expected: dict,
) -> None:
    """The parameters are read back from the built index in the worker (build_info.params)."""
    if miner not in miners.available():
        pytest.skip(f"{miner} is not installed")
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    result = twotower.train(tiny_config(small, tmp_path / "run", miner=miner, **settings))
    assert result.exit_code == 0
    (start,) = events(result.run_dir, "start")
    assert start["miner_build"]["params"] == expected


def test_the_flags_are_on_the_command_line() -> None:
    """`--faiss-nprobe 4` parses (it was "unrecognized arguments")."""
    from twotower.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        "train --demo --faiss-nprobe 4 --faiss-ef-search 64 --hnswlib-m 32 --hnswlib-ef 50".split()
    )
    config = config_from_args(args)
    assert (config.faiss_nprobe, config.faiss_ef_search) == (4, 64)
    assert (config.hnswlib_m, config.hnswlib_ef) == (32, 50)
    with pytest.raises(UsageError, match="--faiss-nprobe must be >= 1"):
        config_from_args(build_parser().parse_args("train --demo --faiss-nprobe 0".split()))

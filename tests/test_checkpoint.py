"""Checkpoints: exact round trip, a real SIGKILL before commit, corruption detected and
skipped, pruning only after commit, and clear errors where there is nothing to load."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from twotower.errors import UsageError
from twotower.training.checkpoint import (
    CheckpointError,
    choose_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

META = {"epoch": 1, "backend": "numpy", "miner": "exact", "config_hash": "abc123"}


def arrays_for(step: int) -> dict[str, np.ndarray]:
    """Mixed dtypes and shapes whose values depend on the step, so checkpoints differ."""
    rng = np.random.default_rng(step)
    return {
        "gru.weight_ih_l0": rng.normal(size=(6, 4)).astype(np.float32),
        "opt.exp_avg.proj.bias": rng.normal(size=4).astype(np.float32),
        "queue.ids": rng.integers(-1, 1000, size=5).astype(np.int64),
        "queue.vecs": np.zeros((0, 4), dtype=np.float32),  # a queue of size 0
        "opt.step": np.array(step, dtype=np.int64),  # 0-d
    }


def assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert actual[name].shape == value.shape, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def save(run: Path, step: int, keep: int = 3) -> Path:
    return save_checkpoint(run, step, arrays_for(step), {**META, "epoch": step}, keep=keep)


def ckpt_names(run: Path) -> list[str]:
    return [path.name for path in list_checkpoints(run)]


def leftovers(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").iterdir() if path.name[0] == ".")


def test_round_trip_is_exact(tmp_path: Path) -> None:
    expected = arrays_for(7)
    expected["transposed"] = expected["gru.weight_ih_l0"].T  # not C-contiguous
    path = save_checkpoint(tmp_path, 7, expected, META, keep=2)
    assert path == tmp_path / "checkpoints" / "step-0000007"
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step-0000007"

    for source in (tmp_path, path):
        meta, state = load_checkpoint(source)
        assert_same_arrays(state, expected)
        assert meta["step"] == 7 and meta["format_version"] == 1
        assert {key: meta[key] for key in META} == META

    # The recorded checksums are of the files' bytes, computed here independently.
    recorded = json.loads((path / "meta.json").read_text())["arrays"]
    for name in expected:
        digest = hashlib.sha256((path / f"{name}.npy").read_bytes()).hexdigest()
        assert recorded[name]["sha256"] == digest
    assert recorded["opt.step"]["shape"] == []


def test_rejects_unsafe_names_and_reserved_meta(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file-name safe"):
        save_checkpoint(tmp_path, 1, {"../escape": np.zeros(1)}, META, keep=1)
    with pytest.raises(ValueError, match="case"):
        save_checkpoint(tmp_path, 1, {"W": np.zeros(1), "w": np.zeros(1)}, META, keep=1)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, 1, {"w": np.zeros(1)}, {"step": 1}, keep=1)
    assert list_checkpoints(tmp_path) == []


CRASHING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from twotower.training.checkpoint import save_checkpoint
    arrays = {"gru.weight_ih_l0": np.full((6, 4), 9.0, dtype=np.float32)}
    save_checkpoint(sys.argv[1], 2, arrays, {}, keep=1,
                    before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))
    """
)


def test_sigkill_before_commit_leaves_previous_checkpoint(tmp_path: Path) -> None:
    save(tmp_path, 1, keep=1)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SAVE, str(tmp_path)], env=env, stderr=subprocess.PIPE
    )
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr.decode()

    # keep=1, yet nothing was pruned: the new checkpoint never committed.
    assert ckpt_names(tmp_path) == ["step-0000001"]
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step-0000001"
    assert leftovers(tmp_path) == [f".tmp-step-0000002-{child.pid}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean fallback-free load
        meta, state = load_checkpoint(tmp_path)
    assert meta["step"] == 1
    assert_same_arrays(state, arrays_for(1))

    save(tmp_path, 3, keep=1)
    assert leftovers(tmp_path) == []
    assert ckpt_names(tmp_path) == ["step-0000003"]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a data byte: the .npy header still parses
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def future_format(path: Path) -> None:
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (flip_byte, "sha256 of queue.ids.npy"),
        (truncate, "sha256 of queue.ids.npy"),
        (future_format, "format_version 99"),
        (delete, "queue.ids.npy is missing"),
    ],
    ids=["flipped-byte", "truncated", "future-format", "missing-array"],
)
def test_corrupt_latest_falls_back_to_previous(tmp_path: Path, corrupt, reason: str) -> None:
    save(tmp_path, 1)
    bad = save(tmp_path, 2)
    corrupt(bad / "queue.ids.npy")

    with pytest.warns(UserWarning, match=f"step-0000002: {reason}.*falling back to step-0000001"):
        meta, state = load_checkpoint(tmp_path)
    assert meta["step"] == 1
    assert_same_arrays(state, arrays_for(1))
    with pytest.warns(UserWarning, match="step-0000002"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-0000001"

    with pytest.raises(CheckpointError, match=f"step-0000002 is not valid: {reason}") as raised:
        load_checkpoint(bad)
    assert "\n" not in str(raised.value)


def test_only_corrupt_checkpoints_is_an_error(tmp_path: Path) -> None:
    bad = save(tmp_path, 1)
    flip_byte(bad / "gru.weight_ih_l0.npy")
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*step-0000001: sha256"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) is None


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path, step, keep=2)
        assert ckpt_names(tmp_path)[-1] == f"step-{step:07d}"
    assert ckpt_names(tmp_path) == ["step-0000004", "step-0000005"]
    assert leftovers(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-0000005"


def test_resumed_run_drops_its_abandoned_future(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save(tmp_path, step)
    (tmp_path / "checkpoints" / "LATEST").write_text("step-0000001")  # resumed from step 1
    save(tmp_path, 2)
    assert ckpt_names(tmp_path) == ["step-0000001", "step-0000002"]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    replacement = arrays_for(20)
    save_checkpoint(tmp_path, 2, replacement, META, keep=3)
    assert ckpt_names(tmp_path) == ["step-0000001", "step-0000002"]
    assert leftovers(tmp_path) == []
    assert_same_arrays(load_checkpoint(tmp_path)[1], replacement)


def test_without_latest_the_newest_valid_loads(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "checkpoints" / "LATEST").unlink()
    assert load_checkpoint(tmp_path)[0]["step"] == 2


def test_before_commit_exception_leaves_nothing_behind(tmp_path: Path) -> None:
    save(tmp_path, 1, keep=1)

    def fail() -> None:
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        save_checkpoint(tmp_path, 2, arrays_for(2), META, keep=1, before_commit=fail)
    assert ckpt_names(tmp_path) == ["step-0000001"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["missing", "empty", "no-step-dirs"])
def test_nothing_to_load_is_a_one_line_error(tmp_path: Path, layout: str) -> None:
    run = tmp_path / "run"
    if layout != "missing":
        run.mkdir()
    if layout == "no-step-dirs":
        (run / "checkpoints").mkdir()
    expected = "does not exist" if layout == "missing" else "holds no step-NNNNNNN"
    with pytest.raises(CheckpointError, match=expected) as raised:
        load_checkpoint(run)
    message = str(raised.value)
    assert str(run) in message and "\n" not in message
    assert latest_checkpoint(run) is None


def test_every_checkpoint_choice_is_parsed_in_one_place(tmp_path: Path) -> None:
    """best, latest and step-N (any digits) mean the same to every command; without a choice
    best/ is taken where the run kept one; another word is a one-line UsageError."""
    run = tmp_path / "run"
    for step in (3, 6):
        save(run, step)
    assert choose_checkpoint(run) == ("latest", run / "checkpoints")  # no best/ yet
    assert load_checkpoint(run, which="step-3")[0]["step"] == 3
    assert choose_checkpoint(run, "step-0000006")[1] == run / "checkpoints" / "step-0000006"
    with pytest.raises(CheckpointError, match="no checkpoint step-0000004"):
        choose_checkpoint(run, "step-4")
    with pytest.raises(CheckpointError, match="no best/"):
        load_checkpoint(run, which="best")
    save_checkpoint(run, 3, arrays_for(3), META, keep=1, store="best")
    assert choose_checkpoint(run) == ("best", run / "best")
    assert load_checkpoint(run, which="best")[0]["step"] == 3
    for word in ("newest", "step-", "step-x", "Best"):
        with pytest.raises(UsageError, match="use best, latest or step-N"):
            choose_checkpoint(run, word)

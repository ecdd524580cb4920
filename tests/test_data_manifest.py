"""twotower/data/manifest.py: value checks and the bank's fingerprint are cached by file
stamps, a file rewritten a moment ago is checked again, and a manifest that cannot be
written is kept in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import twotower.atomic
import twotower.data.chunks
import twotower.data.dataset
import twotower.data.manifest
import twotower.data.synth
from tests.datasets import (
    M,
    age,
    counting,
    rewrite,
    sha256_of_bank,
    small_arrays,
    write_dir,
)
from twotower.data import (
    load_dataset,
)
from twotower.errors import DataError


def test_values_are_checked_once_for_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write_dir(tmp_path / "data", small_arrays())
    age(directory)
    checked = counting(monkeypatch, twotower.data.dataset, "check_values")
    load_dataset(directory)
    load_dataset(directory)
    assert checked[0] == 1
    rewrite(directory / "lengths.npy", (9,), 0)
    with pytest.raises(DataError, match=r"lengths\[9\] = 0"):
        load_dataset(directory)


def test_files_written_a_moment_ago_are_checked_again(tmp_path: Path) -> None:
    """A same-size rewrite within one filesystem clock tick keeps size and mtime: not missed."""
    directory = write_dir(tmp_path / "data", small_arrays())
    first = load_dataset(directory)
    assert first.fingerprint == sha256_of_bank(small_arrays()["bank"])
    rewrite(directory / "bank.npy", (0, 0), np.nan)
    with pytest.raises(DataError, match=r"bank\[0, 0\] = nan"):
        load_dataset(directory)
    rewrite(directory / "bank.npy", (0, 0), 1.0)
    second = load_dataset(directory)
    assert second.fingerprint == sha256_of_bank(np.load(directory / "bank.npy"))
    assert second.fingerprint != first.fingerprint


def test_fingerprint_is_cached_and_follows_the_bank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = small_arrays()
    directory = write_dir(tmp_path / "data", arrays)
    age(directory)
    hashed = counting(monkeypatch, twotower.data.dataset, "bank_digest")
    assert load_dataset(directory).fingerprint == sha256_of_bank(arrays["bank"])
    assert load_dataset(directory).fingerprint == sha256_of_bank(arrays["bank"])
    assert hashed[0] == 1
    rewrite(directory / "bank.npy", (M - 1, 0), 0.0)
    changed = load_dataset(directory).fingerprint
    assert hashed[0] == 2
    assert changed == sha256_of_bank(np.load(directory / "bank.npy"))
    assert changed != sha256_of_bank(arrays["bank"])


def test_an_unwritable_manifest_is_kept_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write_dir(tmp_path / "data", small_arrays())
    age(directory)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(twotower.atomic.os, "replace", refuse)  # the manifest is written through it
    dataset = load_dataset(directory)
    assert dataset.fingerprint == sha256_of_bank(small_arrays()["bank"])
    assert dataset.manifest["fingerprint"]["sha256"] == dataset.fingerprint
    assert "checked" in dataset.manifest
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"{key}.npy" for key in small_arrays()
    )  # no manifest, no partial file left behind

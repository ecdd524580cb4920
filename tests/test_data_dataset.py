"""twotower/data/dataset.py: a Dataset of memory maps from a directory or a .npz (stored
members mapped in place, compressed ones unpacked once into a cache), gathers that match a
plain Python loop, and `convert`.

Expectations come from elsewhere: arrays from tests/datasets.py (plain NumPy) or np.load
without mmap, contexts gathered by a Python loop, sha256 from hashlib.
"""

from __future__ import annotations

import json
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
    T,
    age,
    assert_gathers,
    counting,
    mapped_from,
    plain_arrays,
    sha256_of_bank,
    small_arrays,
    write_dir,
    write_npz,
)
from twotower.data import (
    convert,
    load_dataset,
    npz_cache_dirs,
    parse_key_map,
)
from twotower.errors import DataError, UsageError


@pytest.mark.parametrize("layout", ["ids", "contexts"])
def test_user_directory_without_manifest_loads(tmp_path: Path, layout: str) -> None:
    arrays = small_arrays(layout)
    directory = write_dir(tmp_path / "data", arrays)
    dataset = load_dataset(directory)
    assert_gathers(dataset, arrays, np.arange(len(arrays["positives"])))
    assert json.loads((directory / "manifest.json").read_text())["shapes"]["bank"] == [M, 8]


def test_other_integer_types_are_accepted(tmp_path: Path) -> None:
    arrays = small_arrays()
    narrow = {key: a.astype(np.int32) if a.dtype == np.int64 else a for key, a in arrays.items()}
    dataset = load_dataset(write_dir(tmp_path / "data", narrow))
    assert dataset.lengths.dtype == np.int32  # mapped as stored, not copied
    assert_gathers(dataset, arrays, [3, 1, 4, 1, 5])


def test_anything_past_a_length_is_allowed_and_never_gathered(tmp_path: Path) -> None:
    arrays = small_arrays("contexts")
    row = int(np.flatnonzero(arrays["lengths"] < T)[0])
    arrays["contexts"][row, arrays["lengths"][row] :] = np.nan
    dataset = load_dataset(write_dir(tmp_path / "data", arrays))
    contexts, _, _ = dataset.gather(np.array([row]))
    assert np.isfinite(contexts).all()
    assert_gathers(dataset, arrays, [row])


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
@pytest.mark.parametrize("layout", ["ids", "contexts"])
def test_npz_loads_the_same_numbers_as_the_directory(
    tmp_path: Path, compressed: bool, layout: str
) -> None:
    arrays = small_arrays(layout, seed=5)
    from_dir = load_dataset(write_dir(tmp_path / "data", arrays))
    from_npz = load_dataset(write_npz(tmp_path / "data.npz", arrays, compressed))
    for key, array in arrays.items():
        np.testing.assert_array_equal(getattr(from_npz, key), array)
    rows = np.arange(len(arrays["positives"]))[::-1]
    assert_gathers(from_npz, arrays, rows)
    assert from_npz.fingerprint == from_dir.fingerprint == sha256_of_bank(arrays["bank"])


def test_compressed_npz_is_unpacked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = small_arrays()
    npz = write_npz(tmp_path / "data.npz", arrays, compressed=True)
    age(npz)
    cache = npz_cache_dirs(npz)[0]
    first = load_dataset(npz)
    assert mapped_from(first.bank, cache / "bank.npy")
    before = {key: (cache / f"{key}.npy").stat() for key in arrays}
    extracted = counting(monkeypatch, twotower.data.dataset, "extract")
    checked = counting(monkeypatch, twotower.data.dataset, "check_values")
    second = load_dataset(npz)
    assert extracted[0] == 0 and checked[0] == 0
    for key, stat in before.items():
        now = (cache / f"{key}.npy").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), key
    np.testing.assert_array_equal(second.bank, arrays["bank"])

    changed = small_arrays(seed=9)  # a new file at the same path: unpacked again
    write_npz(npz, changed, compressed=True)
    age(npz)
    third = load_dataset(npz)
    assert extracted[0] == len(arrays)
    np.testing.assert_array_equal(third.bank, changed["bank"])


def test_compressed_npz_falls_back_to_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = small_arrays()
    npz = write_npz(tmp_path / "data.npz", arrays, compressed=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    beside, user = npz_cache_dirs(npz)
    real_writable = twotower.data.dataset._writable
    monkeypatch.setattr(
        twotower.data.dataset, "_writable", lambda d: d != beside and real_writable(d)
    )
    dataset = load_dataset(npz)
    assert user.is_relative_to(tmp_path / "user-cache")
    assert mapped_from(dataset.bank, user / "bank.npy")
    np.testing.assert_array_equal(dataset.bank, arrays["bank"])

    monkeypatch.setattr(twotower.data.dataset, "_writable", lambda d: False)
    (user / "manifest.json").unlink()
    with pytest.raises(DataError, match="twotower convert"):
        load_dataset(npz)


def test_convert_streams_members_under_other_names(tmp_path: Path) -> None:
    arrays = small_arrays()
    names = {"bank": "emb", "context_ids": "ids", "lengths": "len", "positives": "pos"}
    npz = write_npz(
        tmp_path / "user.npz", {names[k]: a for k, a in arrays.items()}, compressed=True
    )
    out = tmp_path / "converted"
    dataset = convert(
        npz, out, key_map=parse_key_map("bank=emb, context_ids=ids,lengths=len,positives=pos")
    )
    assert dataset.path == out
    for key, array in plain_arrays(out).items():
        np.testing.assert_array_equal(array, arrays[key])
        assert mapped_from(getattr(dataset, key), out / f"{key}.npy")
    assert dataset.manifest["made_by"]["members"]["bank"] == "emb"
    np.testing.assert_array_equal(load_dataset(out).positives, arrays["positives"])
    with pytest.raises(UsageError, match="already holds bank.npy"):
        convert(npz, out, key_map=names)


def test_convert_refuses_bad_input_and_leaves_nothing(tmp_path: Path) -> None:
    arrays = small_arrays()
    arrays["lengths"][5] = 0
    npz = write_npz(tmp_path / "data.npz", arrays, compressed=False)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"data.npz: lengths\[5\] = 0"):
        convert(npz, out)
    assert list(out.iterdir()) == []
    with pytest.raises(UsageError, match="unknown dataset key 'embeddings'"):
        convert(npz, out, key_map={"embeddings": "bank"})
    with pytest.raises(DataError, match="has no member 'emb' for bank"):
        convert(npz, tmp_path / "other", key_map={"bank": "emb"})
    assert not (tmp_path / "other").exists()  # the layout is checked before anything is written


def test_parse_key_map() -> None:
    assert parse_key_map("bank=emb,positives=pos") == {"bank": "emb", "positives": "pos"}
    assert parse_key_map("") == {}
    for bad in ("bank", "bank=", "vectors=emb"):
        with pytest.raises(UsageError, match="expected KEY=NAME"):
            parse_key_map(bad)


def test_validate_false_skips_values_but_not_layout(tmp_path: Path) -> None:
    arrays = small_arrays()
    arrays["positives"][0] = M
    dataset = load_dataset(write_dir(tmp_path / "a", arrays), validate=False)
    assert dataset.positives[0] == M
    arrays["bank"] = arrays["bank"].astype(np.float64)
    with pytest.raises(DataError, match="must be float32"):
        load_dataset(write_dir(tmp_path / "b", arrays), validate=False)

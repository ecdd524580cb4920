"""twotower.data: datasets are memory-mapped, never read whole, checked first, and learnable.

Expectations come from elsewhere: arrays from tests/datasets.py (plain NumPy)
or np.load without mmap, contexts gathered by a Python loop, sha256 from
hashlib, memory from /proc, recall from a brute-force NumPy search.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import twotower.atomic
import twotower.data.chunks
import twotower.data.dataset
import twotower.data.manifest
import twotower.data.synth
from tests.datasets import (
    BROKEN_DATASETS,
    M,
    T,
    age,
    small_arrays,
    write_dir,
    write_npz,
)
from twotower import Batch, backends
from twotower.cli import main
from twotower.data import (
    DEMO_SIZES,
    Dataset,
    convert,
    load_dataset,
    npz_cache_dirs,
    parse_key_map,
    synthesize,
)
from twotower.errors import EXIT_USAGE, DataError, UsageError
from twotower.training.heldout import held_out_split

# --- independent expectations -------------------------------------------------


def plain_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Every array of a dataset directory, read whole by np.load (no mmap)."""
    keys = ("bank", "contexts", "context_ids", "lengths", "positives")
    return {
        key: np.load(directory / f"{key}.npy")
        for key in keys
        if (directory / f"{key}.npy").exists()
    }


def expected_gather(arrays: dict[str, np.ndarray], rows: np.ndarray):
    """contexts (B, T, D) built one step at a time, zero past each length; lengths; positives."""
    lengths = arrays["lengths"][rows].astype(np.int64)
    seq_len = (arrays["contexts"] if "contexts" in arrays else arrays["context_ids"]).shape[1]
    contexts = np.zeros((len(rows), seq_len, arrays["bank"].shape[1]), dtype=np.float32)
    for b, row in enumerate(rows):
        for t in range(lengths[b]):
            if "contexts" in arrays:
                contexts[b, t] = arrays["contexts"][row, t]
            else:
                contexts[b, t] = arrays["bank"][arrays["context_ids"][row, t]]
    return contexts, lengths, arrays["positives"][rows].astype(np.int64)


def assert_gathers(dataset: Dataset, arrays: dict[str, np.ndarray], rows) -> None:
    rows = np.asarray(rows)
    got = dataset.gather(rows)
    for actual, expected, dtype in zip(
        got, expected_gather(arrays, rows), (np.float32, np.int64, np.int64), strict=True
    ):
        assert actual.dtype == dtype
        assert actual.flags.c_contiguous
        np.testing.assert_array_equal(actual, expected)


def mapped_from(array: np.ndarray, path: Path) -> bool:
    """True if `array` is a read-only memory map of the file `path`."""
    return (
        isinstance(array, np.memmap)
        and Path(array.filename) == path.resolve()
        and not array.flags.writeable
    )


def sha256_of_bank(bank: np.ndarray) -> str:
    rows, dim = bank.shape
    header = f"twotower-bank <f4 {rows}x{dim}\n".encode()
    return hashlib.sha256(header + np.ascontiguousarray(bank, dtype="<f4").tobytes()).hexdigest()


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Wrap module.name to count its calls; returns the one-element counter."""
    calls = [0]
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def rewrite(path: Path, index: tuple, value: float) -> None:
    """Save the .npy file at `path` again with array[index] = value: same size, new content."""
    array = np.load(path)
    array[index] = value
    np.save(path, array)


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ids", "contexts"])
def test_synthesize_round_trip(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "synth"
    dataset = synthesize(out, samples=200, bank=90, dim=16, seq_len=7, seed=3, layout=layout)
    plain = plain_arrays(out)
    assert sorted(plain) == sorted(
        ["bank", "lengths", "positives", "context_ids" if layout == "ids" else "contexts"]
    )
    for key, array in plain.items():
        mapped = getattr(dataset, key)
        assert mapped_from(mapped, out / f"{key}.npy"), key
        np.testing.assert_array_equal(mapped, array)
    sizes = (dataset.num_samples, dataset.seq_len, dataset.dim, dataset.bank_size)
    assert sizes == (200, 7, 16, 90)
    assert dataset.layout == layout
    assert_gathers(dataset, plain, [0, 5, 199, 5, 37])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["made_by"]["recipe"]["layout"] == layout
    assert manifest["shapes"]["bank"] == [90, 16]
    assert manifest["format_version"] == 1


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


# --- .npz -----------------------------------------------------------------------


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


def test_stored_npz_is_mapped_in_place(tmp_path: Path) -> None:
    arrays = small_arrays()
    npz = write_npz(tmp_path / "data.npz", arrays, compressed=False)
    dataset = load_dataset(npz)
    offsets = set()
    for key in arrays:
        array = getattr(dataset, key)
        assert mapped_from(array, npz), key
        offsets.add(array.offset)
    assert len(offsets) == len(arrays) and min(offsets) > 0  # each at its own member
    assert not list(npz_cache_dirs(npz)[0].glob("*.npy"))  # nothing unpacked


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


@pytest.mark.slow
def test_stored_npz_does_not_enter_memory(tmp_path: Path) -> None:
    rows, dim, samples = 100_000, 768, 20_000  # a 307 MB bank
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", "w+", np.float32, (rows, dim))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 10_000):
        bank[start : start + 10_000] = rng.standard_normal((10_000, dim), dtype=np.float32)
    ids = rng.integers(0, rows, size=(samples, 10))
    npz = tmp_path / "big.npz"
    np.savez(npz, bank=bank, context_ids=ids, lengths=np.full(samples, 10), positives=ids[:, 0])
    del bank
    report = run_measured(
        """
        dataset = load_dataset(sys.argv[1])
        for rows in np.array_split(np.arange(dataset.num_samples), dataset.num_samples // 256):
            contexts, lengths, positives = dataset.gather(rows)
            dataset.bank[positives].sum()
        report = {"mapped": isinstance(dataset.bank, np.memmap)}
        """,
        npz,
        tmp_path,
    )
    size = npz.stat().st_size
    assert size > 300e6
    assert report["mapped"]
    # reading the bank whole would add >= 307 MB; what is allowed is chunks, batches and the
    # allocator keeping some of them (about 16 MB seen)
    assert report["growth"] < size / 4, f"RssAnon grew by {report['growth'] / 1e6:.0f} MB"


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


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [case[1:] for case in BROKEN_DATASETS],
    ids=[c[0] for c in BROKEN_DATASETS],
)
def test_broken_dataset_is_one_clear_line(tmp_path: Path, make, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == EXIT_USAGE
    assert "\n" not in message
    assert message.startswith(str(tmp_path)), message  # names the file by its path
    assert expected in message, message


@pytest.mark.parametrize("compressed", [None, False, True], ids=["dir", "stored", "compressed"])
@pytest.mark.parametrize("layout", ["ids", "contexts"])
def test_catalogue_base_is_valid(tmp_path: Path, compressed: bool | None, layout: str) -> None:
    """Negative control: the arrays every broken case starts from load cleanly."""
    arrays = small_arrays(layout)
    if compressed is None:
        path = write_dir(tmp_path / "data", arrays)
    else:
        path = write_npz(tmp_path / "data.npz", arrays, compressed)
    assert load_dataset(path).num_samples == len(arrays["positives"])


def test_first_bad_index_is_found_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(twotower.data.chunks, "CHUNK_BYTES", 24)  # 3 lengths, 1 bank row a chunk
    arrays = small_arrays()
    arrays["lengths"][[37, 50]] = 0
    with pytest.raises(DataError, match=r"lengths\[37\] = 0"):
        load_dataset(write_dir(tmp_path / "a", arrays))
    arrays = small_arrays()
    arrays["bank"][33, 1] = np.inf
    arrays["bank"][35, 0] = np.nan
    with pytest.raises(DataError, match=r"bank\[33, 1\] = inf"):
        load_dataset(write_dir(tmp_path / "b", arrays))


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


def test_validate_false_skips_values_but_not_layout(tmp_path: Path) -> None:
    arrays = small_arrays()
    arrays["positives"][0] = M
    dataset = load_dataset(write_dir(tmp_path / "a", arrays), validate=False)
    assert dataset.positives[0] == M
    arrays["bank"] = arrays["bank"].astype(np.float64)
    with pytest.raises(DataError, match="must be float32"):
        load_dataset(write_dir(tmp_path / "b", arrays), validate=False)


# --- fingerprint and manifest ---------------------------------------------------


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


# --- held_out_split ----------------------------------------------------------------


def test_held_out_split() -> None:
    train, held = held_out_split(1000, 0.1, 50, seed=4)
    assert train.dtype == held.dtype == np.int64
    assert len(held) == 50 and len(train) == 950
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    again_train, again_held = held_out_split(1000, 0.1, 50, seed=4)
    np.testing.assert_array_equal(again_held, held)
    assert not np.array_equal(held_out_split(1000, 0.1, 50, seed=5)[1], held)
    assert len(held_out_split(1000, 0.02, 10**6, seed=0)[1]) == 20
    assert len(held_out_split(1, 0.5, 10, seed=0)[0]) == 1  # at least one training row
    for bad in ((0, 0.1, 5), (10, 1.0, 5), (10, -0.1, 5), (10, 0.1, -1)):
        with pytest.raises(UsageError):
            held_out_split(*bad, seed=0)


# --- synthesize -----------------------------------------------------------------


def test_synthesize_is_deterministic_and_reuses_its_recipe(tmp_path: Path) -> None:
    sizes = {"samples": 300, "bank": 120, "dim": 8, "seq_len": 5}
    synthesize(tmp_path / "a", seed=1, **sizes)
    synthesize(tmp_path / "b", seed=1, **sizes)
    synthesize(tmp_path / "c", seed=2, **sizes)
    a, b, c = (plain_arrays(tmp_path / name) for name in "abc")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["bank"], c["bank"])

    before = (tmp_path / "a" / "bank.npy").stat()
    synthesize(tmp_path / "a", seed=1, **sizes)
    after = (tmp_path / "a" / "bank.npy").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(UsageError, match="already holds a dataset"):
        synthesize(tmp_path / "a", seed=2, **sizes)
    synthesize(tmp_path / "a", seed=2, overwrite=True, **sizes)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "bank.npy"), c["bank"])


def test_synthesize_refuses_bad_sizes(tmp_path: Path) -> None:
    bad_sizes = (
        {"bank": 1},
        {"samples": 0},
        {"dim": 2.5},
        {"seed": -1},
        {"layout": "dense"},
        {"follow": 1.5},
    )
    for bad in bad_sizes:
        with pytest.raises(UsageError):
            synthesize(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_an_interrupted_synthesize_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(twotower.data.synth, "_walks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "x", samples=10, bank=10, dim=4)
    assert list((tmp_path / "x").iterdir()) == []


def test_synthetic_positive_follows_the_last_item_not_the_mean(tmp_path: Path) -> None:
    """The structure promised: a linear map of the last context vector finds the positive;
    the same fit from the mean of the sequence does far worse. Variable lengths, -1 padding."""
    dataset = synthesize(tmp_path / "s", samples=3000, bank=1500, dim=32, seq_len=8)
    plain = plain_arrays(tmp_path / "s")
    bank, ids, lengths, positives = (
        plain[k] for k in ("bank", "context_ids", "lengths", "positives")
    )
    assert set(np.unique(lengths)) == set(range(1, 9))
    np.testing.assert_array_equal(ids == -1, np.arange(8)[None, :] >= lengths[:, None])
    contexts, _, _ = expected_gather(plain, np.arange(dataset.num_samples))
    last = contexts[np.arange(len(lengths)), lengths - 1]
    mean = contexts.sum(axis=1) / lengths[:, None]
    fit, held = slice(0, 2000), slice(2000, None)

    def linear_recall(features: np.ndarray) -> float:
        weights, *_ = np.linalg.lstsq(features[fit], bank[positives[fit]], rcond=None)
        scores = features[held] @ weights @ bank.T
        top10 = np.argpartition(-scores, 10, axis=1)[:, :10]
        return float(np.mean(np.any(top10 == positives[held, None], axis=1)))

    from_last, from_mean = linear_recall(last), linear_recall(mean)
    assert from_last > 0.9, from_last
    assert from_mean < from_last - 0.4, (from_last, from_mean)


@pytest.mark.slow
def test_synthesize_writes_a_big_bank_in_bounded_memory(tmp_path: Path) -> None:
    report = run_measured(
        """
        dataset = synthesize(sys.argv[1], samples=20_000, bank=200_000, dim=384, seq_len=10)
        report = {"bytes": dataset.bank.nbytes}
        """,
        tmp_path / "big",
        tmp_path,
    )
    assert report["bytes"] == 200_000 * 384 * 4
    assert report["growth"] < report["bytes"] / 4, (
        f"RssAnon grew by {report['growth'] / 1e6:.0f} MB"
    )


def test_synth_says_what_it_wrote_in_one_sentence(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    flags = "--samples 300 --bank 100 --dim 8 --seq-len 5".split()
    assert main(["synth", "--out", str(out), *flags]) == 0
    size = sum(file.stat().st_size for file in out.iterdir())
    assert capsys.readouterr().out == (
        f"{out} holds a synthetic dataset: 300 samples of up to 5 context items (layout ids: "
        f"bank rows), a bank of 100 x 8 vectors, {size / 1024:,.0f} KiB on disk\n"
    )


def test_demo_sizes_are_the_defaults(tmp_path: Path) -> None:
    recipe = synthesize(tmp_path / "demo").manifest["made_by"]["recipe"]
    assert {key: recipe[key] for key in DEMO_SIZES} == DEMO_SIZES


@pytest.fixture
def one_torch_thread():
    """Tiny GEMMs: a second intra-op thread only adds contention on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_data_is_learnable_by_a_gru_more_than_by_a_mean_pool(
    tmp_path: Path, one_torch_thread
) -> None:
    dataset = synthesize(tmp_path / "s", samples=4000, bank=2000, dim=32, seq_len=10)
    train, held = held_out_split(dataset.num_samples, 0.125, 500, seed=0)
    bank = np.asarray(dataset.bank)
    eval_contexts, eval_lengths, eval_positives = dataset.gather(held)

    def recall_at_10(backend) -> float:
        scores = backend.encode(eval_contexts, eval_lengths) @ bank.T
        top10 = np.argpartition(-scores, 10, axis=1)[:, :10]
        return float(np.mean(np.any(top10 == eval_positives[:, None], axis=1)))

    recall = {}
    for tower in ("gru", "meanpool"):
        backend = backends.get("torch-cpu", tower=tower, dim=32, hidden=32, lr=3e-3, seed=0)
        before = recall_at_10(backend)
        rng = np.random.default_rng(0)
        for _ in range(300):
            contexts, lengths, positives = dataset.gather(
                np.sort(rng.choice(train, 32, replace=False))
            )
            backend.step(Batch.in_batch_only(contexts, lengths, positives, bank[positives]))
        recall[tower] = (before, recall_at_10(backend))
    chance = 10 / dataset.bank_size
    assert recall["gru"][0] < 5 * chance, recall
    assert recall["gru"][1] > 0.6, recall  # > 100 x chance
    assert recall["meanpool"][1] < recall["gru"][1] - 0.3, recall

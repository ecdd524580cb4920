"""Synthetic datasets with structure a GRU learns quickly and a mean-pool cannot fully learn.

The bank is a set of chains. Chain c starts near one of `clusters` random unit
centres; each next item is a fixed random orthogonal map R of the one before
(a signed cyclic shift of the coordinates: O(D) per item, where a dense
rotation would take minutes on a 771k x 768 bank), plus a little noise,
renormalised. So the bank is clustered (the items of one cluster at one chain
step stay together) and next(item) is about R item. Rows are step-major:
step s of chain c is row s * num_chains + c.

A sample is a noisy walk that ends at an item e with a successor; read
backwards from e, each earlier item is the chain predecessor of the item after
it with probability `follow`, else a random item. The positive is e's
successor. A tower that outputs R x_last finds it (a GRU can learn to keep the
last step, its projection to rotate it); the mean of the sequence dilutes
x_last with items that say little about the positive, and a mean-pool cannot
tell which item came last.

Everything is written in blocks through `np.lib.format.open_memmap`, so sizes
beyond memory work (a 771k x 768 bank is 2.37 GB), and the random draws of
each block come from SeedSequence([seed, purpose, block]), so a seed gives the
same dataset whatever the machine's memory.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from twotower.atomic import replacing
from twotower.data.chunks import progress, row_ranges
from twotower.data.dataset import Dataset, load_dataset, open_directory, sequences_from_ids
from twotower.data.manifest import MANIFEST, read_manifest, save_manifest
from twotower.data.validate import KEYS
from twotower.errors import UsageError

GENERATOR_VERSION = 1  # bump when the same recipe would give other numbers
LAYOUTS = ("ids", "contexts")
DEMO_SIZES = {"samples": 20_000, "bank": 10_000, "dim": 64, "seq_len": 10}
CHAINS_PER_BLOCK = 16_384  # bank rows are drawn per block of chains (16384 x D held at once)
INT8_VARIANCE = (256**2 - 1) / 12  # variance of a uniform draw over -128..127
SAMPLES_PER_BLOCK = 65_536  # samples are drawn per block of samples
ROTATION_PURPOSE, CENTRES_PURPOSE, BANK_PURPOSE, SAMPLES_PURPOSE = 0x5107, 0x5C, 0xBA2C, 0x5A3

Recipe = dict[str, Any]


def synthesize(
    path: str | os.PathLike[str],
    samples: int = DEMO_SIZES["samples"],
    bank: int = DEMO_SIZES["bank"],
    dim: int = DEMO_SIZES["dim"],
    seq_len: int = DEMO_SIZES["seq_len"],
    seed: int = 0,
    *,
    layout: str = "ids",
    clusters: int = 32,
    chain_len: int = 8,
    follow: float = 0.5,
    spread: float = 0.3,
    step_noise: float = 0.6,
    overwrite: bool = False,
) -> Dataset:
    """Write a synthetic dataset directory at `path` and open it; see the module docstring.

    samples N, bank M, dim D, seq_len T (lengths uniform in 1..T); layout "ids"
    (context_ids (N, T), compact) or "contexts" ((N, T, D) vectors); clusters:
    cluster centres; chain_len: items per chain; follow: the chance that a walk
    step follows the chain; spread: how far chain starts lie from their centre;
    step_noise: the noise added to each rotation step. The defaults make the
    demo dataset (DEMO_SIZES). The manifest records all of it. If `path`
    already holds a dataset made from the same recipe it is opened as is; any
    other dataset there is refused unless `overwrite`.
    """
    recipe: Recipe = {
        "generator": GENERATOR_VERSION,
        "samples": samples,
        "bank": bank,
        "dim": dim,
        "seq_len": seq_len,
        "seed": seed,
        "layout": layout,
        "clusters": clusters,
        "chain_len": chain_len,
        "follow": follow,
        "spread": spread,
        "step_noise": step_noise,
    }
    _check_recipe(recipe)
    out = Path(path)
    existing = [out / f"{key}.npy" for key in KEYS] + [out / MANIFEST]
    if any(file.exists() for file in existing):
        made_by = read_manifest(out / MANIFEST, strict=False).get("made_by", {})
        if isinstance(made_by, dict) and made_by.get("recipe") == recipe:
            return load_dataset(out)
        if not overwrite:
            raise UsageError(
                f"{out}: already holds a dataset; choose another directory or delete it"
            )
        for file in existing:
            file.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_dataset(out, recipe)
    save_manifest(out / MANIFEST, {"made_by": {"how": "twotower.synthesize", "recipe": recipe}})
    return open_directory(out, ours=True)


def _check_recipe(recipe: Recipe) -> None:
    minimum = {
        "samples": 1,
        "bank": 2,
        "dim": 1,
        "seq_len": 1,
        "seed": 0,
        "clusters": 1,
        "chain_len": 2,
    }
    for name, low in minimum.items():
        if not (isinstance(recipe[name], int) and recipe[name] >= low):
            raise UsageError(
                f"synthesize: {name} must be a whole number >= {low}, got {recipe[name]}"
            )
    if recipe["layout"] not in LAYOUTS:
        raise UsageError(f"synthesize: layout must be one of {', '.join(LAYOUTS)}")
    if not 0.0 <= recipe["follow"] <= 1.0:
        raise UsageError(f"synthesize: follow must be in [0, 1], got {recipe['follow']}")
    for name in ("spread", "step_noise"):
        if not recipe[name] >= 0.0:
            raise UsageError(f"synthesize: {name} must be >= 0, got {recipe[name]}")


def _rng(seed: int, purpose: int, block: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, block]))


def _rotation(dim: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """R, the fixed orthogonal map: x (n, D) -> (n, D) float32, a random signed cyclic shift."""
    rng = _rng(seed, ROTATION_PURPOSE)
    shift = int(rng.integers(1, dim)) if dim > 1 else 0
    signs = np.where(rng.random(dim) < 0.5, -1.0, 1.0).astype(np.float32)

    def rotate(x: np.ndarray) -> np.ndarray:
        rotated = np.roll(x, shift, axis=1)
        rotated *= signs
        return rotated

    return rotate


def _noise(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """(count, D) float32 noise, each coordinate of mean 0 and variance 1 / D (norm about 1).

    Uniform over 256 levels drawn as random bytes: a quarter of the cost of
    normal draws, which dominated the time to write a big bank.
    """
    levels = np.frombuffer(rng.bytes(count * dim), dtype=np.int8).reshape(count, dim)
    noise = levels.astype(np.float32)
    noise *= 1.0 / math.sqrt(INT8_VARIANCE * dim)
    return noise


def _has_successor(items: np.ndarray, num_chains: int, num_rows: int) -> np.ndarray:
    """True for the bank rows whose chain goes on: the next item exists, and is a positive."""
    return items + num_chains < num_rows


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Scale each row of x (n, D) to unit length, in place; returns x."""
    x *= (1.0 / np.sqrt(np.einsum("ij,ij->i", x, x)))[:, None].astype(x.dtype)
    return x


class _Writer:
    """The dataset's .npy files, written under temporary names (`atomic.replacing`): renamed
    by `commit`, removed if the `with` block fails."""

    def __init__(self, out: Path):
        self.out = out
        self.arrays: dict[str, np.memmap] = {}
        self.files = contextlib.ExitStack()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.arrays.clear()
        self.files.__exit__(*exc)

    def create(self, key: str, shape: tuple[int, ...], dtype: type) -> np.memmap:
        partial = self.files.enter_context(replacing(self.out / f"{key}.npy"))
        self.arrays[key] = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        return self.arrays[key]

    def commit(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        self.files.close()


def _write_dataset(out: Path, recipe: Recipe) -> None:
    with _Writer(out) as writer:
        _write_arrays(writer, recipe)
        writer.commit()


def _write_arrays(writer: _Writer, recipe: Recipe) -> None:
    bank = writer.create("bank", (recipe["bank"], recipe["dim"]), np.float32)
    _write_bank(bank, recipe)
    num, seq_len = recipe["samples"], recipe["seq_len"]
    lengths = writer.create("lengths", (num,), np.int64)
    positives = writer.create("positives", (num,), np.int64)
    if recipe["layout"] == "ids":
        ids_out: np.memmap | None = writer.create("context_ids", (num, seq_len), np.int64)
    else:
        ids_out = None
        contexts = writer.create("contexts", (num, seq_len, recipe["dim"]), np.float32)
    for block, start in enumerate(range(0, num, SAMPLES_PER_BLOCK)):
        stop = min(start + SAMPLES_PER_BLOCK, num)
        ids, lengths[start:stop], positives[start:stop] = _walks(recipe, block, stop - start)
        if ids_out is not None:
            ids_out[start:stop] = ids
            continue
        row_bytes = seq_len * recipe["dim"] * 4
        for first, last in row_ranges(stop - start, row_bytes, "writing contexts"):
            block_lengths = lengths[start + first : start + last]
            vectors = sequences_from_ids(bank, ids[first:last], block_lengths)
            contexts[start + first : start + last] = vectors


def _write_bank(bank: np.memmap, recipe: Recipe) -> None:
    """Fill bank (M, D) step-major: step s of chain c is row s * num_chains + c.

    A block of chains advances one step at a time, so only (chains, D) is held
    and each step's rows are one contiguous slice.
    """
    num_rows, dim = bank.shape
    seed = recipe["seed"]
    rotate = _rotation(dim, seed)
    centres = _unit_rows(_rng(seed, CENTRES_PURPOSE).standard_normal((recipe["clusters"], dim)))
    num_chains = math.ceil(num_rows / recipe["chain_len"])
    with progress(bank.nbytes, "writing the bank") as bar:
        for block, first in enumerate(range(0, num_chains, CHAINS_PER_BLOCK)):
            rng = _rng(seed, BANK_PURPOSE, block)
            count = min(CHAINS_PER_BLOCK, num_chains - first)
            item = centres[rng.integers(len(centres), size=count)].astype(np.float32)
            item += recipe["spread"] * _noise(rng, count, dim)
            for step in range(recipe["chain_len"]):
                if step:
                    item = rotate(item) + recipe["step_noise"] * _noise(rng, count, dim)
                _unit_rows(item)
                start = step * num_chains + first
                stop = min(start + count, num_rows)
                bank[start:stop] = item[: max(stop - start, 0)]
                bar.update(max(stop - start, 0) * dim * 4)


def _walks(recipe: Recipe, block: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` samples of block `block`: context ids (count, T) -1 padded, lengths, positives."""
    num_rows, seq_len = recipe["bank"], recipe["seq_len"]
    num_chains = math.ceil(num_rows / recipe["chain_len"])
    rng = _rng(recipe["seed"], SAMPLES_PURPOSE, block)
    lengths = rng.integers(1, seq_len + 1, size=count)
    last = rng.integers(0, num_rows, size=count)
    no_successor = ~_has_successor(last, num_chains, num_rows)
    while no_successor.any():  # rejection: the last item is uniform over items with a successor
        last[no_successor] = rng.integers(0, num_rows, size=int(no_successor.sum()))
        no_successor = ~_has_successor(last, num_chains, num_rows)
    ids = np.full((count, seq_len), -1, dtype=np.int64)
    rows = np.arange(count)
    ids[rows, lengths - 1] = last
    item = last
    for back in range(1, seq_len):
        follows = (rng.random(count) < recipe["follow"]) & (item >= num_chains)
        item = np.where(follows, item - num_chains, rng.integers(0, num_rows, size=count))
        position = lengths - 1 - back
        inside = position >= 0
        ids[rows[inside], position[inside]] = item[inside]
    return ids, lengths, last + num_chains

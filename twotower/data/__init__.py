"""Datasets: open (memory-mapped, never read whole), validate, convert, synthesize.

    load_dataset(path) -> Dataset            a directory of .npy files, or a .npz
    convert(npz, out_dir, key_map) -> Dataset    a .npz streamed into a directory
    synthesize(path, **sizes) -> Dataset     a learnable synthetic dataset

Modules: dataset (Dataset, loading, convert), npy (.npy headers, .npz members
mapped in place or streamed), validate (the checks), manifest (manifest.json
and its caches), synth (synthetic data), chunks (chunked passes, progress bars).
"""

from __future__ import annotations

from twotower.data.dataset import (
    Dataset,
    bank_digest,
    convert,
    load_dataset,
    npz_cache_dirs,
    parse_key_map,
)
from twotower.data.manifest import FORMAT_VERSION, MANIFEST
from twotower.data.synth import DEMO_SIZES, LAYOUTS, synthesize
from twotower.data.validate import KEYS

__all__ = [
    "DEMO_SIZES",
    "FORMAT_VERSION",
    "KEYS",
    "LAYOUTS",
    "MANIFEST",
    "Dataset",
    "bank_digest",
    "convert",
    "load_dataset",
    "npz_cache_dirs",
    "parse_key_map",
    "synthesize",
]

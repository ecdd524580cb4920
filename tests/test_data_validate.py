"""twotower/data/validate.py: every broken dataset of the catalogue (tests/datasets.py) fails
as one line naming the file and the array; the first bad value is found across chunks."""

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
    BROKEN_DATASETS,
    small_arrays,
    write_dir,
    write_npz,
)
from twotower.data import (
    load_dataset,
)
from twotower.errors import EXIT_USAGE, DataError, UsageError


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

"""The quality benchmark's dataset builder (bench/quality/build_dataset.py): paragraphs of a
rendered man page, next-paragraph sequences with the context_ids layout, groups = page; the
second corpus's documentation files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from bench.quality.build_dataset import paragraphs, sequences
from bench.quality.doc_corpus import doc_paragraphs

RENDERED = """TAR(1)                    GNU TAR Manual                    TAR(1)

NAME
       tar - an archiving utility for files

DESCRIPTION
       GNU tar is an archiving program designed to store many files.
       It continues on a second line.

   Option styles
       Options to GNU tar can be given in three different styles.
       short
       -v, --verbose verbosely list files processed here

GNU TAR 1.34                      2021-02-13                          TAR(1)
"""


def test_paragraphs_are_body_text_split_at_blank_lines_and_headings() -> None:
    assert paragraphs(RENDERED) == [
        "tar - an archiving utility for files",
        "GNU tar is an archiving program designed to store many files. It continues on a "
        "second line.",
        "Options to GNU tar can be given in three different styles. short -v, --verbose "
        "verbosely list files processed here",
    ]


def test_sequences_predict_each_paragraph_from_the_ones_before() -> None:
    docs = [[10, 11, 12, 13], [20, 21, 10]]  # item 10 appears in both pages
    arrays = sequences(docs, seq_len=2)
    assert arrays["context_ids"].tolist() == [
        [10, -1],
        [10, 11],
        [11, 12],
        [20, -1],
        [20, 21],
    ]
    assert arrays["lengths"].tolist() == [1, 2, 2, 1, 2]
    assert arrays["positives"].tolist() == [11, 12, 13, 21, 10]
    assert arrays["groups"].tolist() == [0, 0, 0, 1, 1]
    assert all(a.dtype == np.int64 for a in arrays.values())


def test_doc_files_are_split_at_blank_lines_gzipped_or_not(tmp_path: Path) -> None:
    text = "Title\n\nThis   paragraph has\nsix words in it.\n\n  \nToo short.\n\n-- -- -- -- --\n"
    plain = tmp_path / "README"
    plain.write_text(text)
    packed = tmp_path / "NEWS.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, packed):
        assert doc_paragraphs(path) == ["This paragraph has six words in it."]
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    assert doc_paragraphs(tmp_path / "bad.gz") == []

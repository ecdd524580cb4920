"""The second quality corpus: the documentation Debian packages install under /usr/share/doc
(README, NEWS, *.md, *.txt, *.rst; gzipped or not), a different kind of prose from man pages:
project descriptions, release notes, how-tos. Changelogs and copyright files are left out
(templated), and a package gives at most PER_PACKAGE files (git alone ships hundreds of
release notes). Each file is one document; its paragraphs are blocks between blank lines, with
whitespace collapsed, at least 5 words, cut to 300 characters, at most 40 a file.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

DOC_DIR = Path("/usr/share/doc")
NAMES = re.compile(r"^(readme|news|.*\.(md|txt|rst))(\.gz)?$", re.IGNORECASE)
MIN_WORDS, MAX_CHARS, MAX_PARAGRAPHS = 5, 300, 40
PER_PACKAGE = 3


def doc_paragraphs(path: Path) -> list[str]:
    """The paragraphs of one documentation file (empty if it cannot be read as text)."""
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return []
    out = []
    for block in re.split(r"\n\s*\n", text):
        paragraph = re.sub(r"\s+", " ", block).strip()
        if len(paragraph.split()) >= MIN_WORDS and re.search(r"[a-z]{3}", paragraph):
            out.append(paragraph[:MAX_CHARS])
    return out[:MAX_PARAGRAPHS]


def doc_files() -> Iterator[tuple[str, list[str]]]:
    """(file path under DOC_DIR, its paragraphs), in the order of sha256(path)."""
    files = [path for path in DOC_DIR.rglob("*") if path.is_file() and NAMES.match(path.name)]
    names = {path: str(path.relative_to(DOC_DIR)) for path in files}
    ordered = sorted(files, key=lambda p: hashlib.sha256(names[p].encode()).hexdigest())
    taken: dict[str, int] = {}
    for path in ordered:
        package = names[path].split("/")[0]
        taken[package] = taken.get(package, 0) + 1
        if taken[package] <= PER_PACKAGE:
            yield names[path], doc_paragraphs(path)

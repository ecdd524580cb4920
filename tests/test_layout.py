"""The package's parts import one way: face -> guard -> diagnose -> serve -> training -> run ->
data / backends / miners -> shared top-level modules -> reference (numpy only).

Read with ast, nothing executed: every `import` and `from ... import`, including those inside
functions, counts.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FACE = {"twotower", "twotower.cli", "twotower.train_flags", "twotower.__main__"}
# higher ranks may import lower ones, never the reverse; equal ranks may import each other
RANKS = {
    "guard": 7,
    "diagnose": 6,
    "serve": 5,
    "training": 4,
    "run": 3,
    "data": 2,
    "backends": 2,
    "miners": 2,
}
# Inside training/, the loop (set-up, the step, the trainer, resume) uses its parts; the parts
# (negatives, evaluation, ranks) never reach back into it, so serve/ and replay can use them alone.
LOOP = {
    f"twotower.training.{name}" for name in ("trainer", "setup", "setup_checks", "step", "resume")
}
TRAINING_PARTS = tuple(
    f"twotower.training.{part}." for part in ("negatives", "evaluation", "ranks")
)
SHARED = 1  # the modules directly under twotower/ that are not the face
REFERENCE = 0


def module_name(path: Path, root: Path) -> str:
    """'twotower/guard/monitor.py' -> 'twotower.guard.monitor'; a package's __init__ -> its name."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank(module: str) -> int:
    """The rank of a twotower (or reference) module name; the face ranks above everything."""
    if module == "reference" or module.startswith("reference."):
        return REFERENCE
    if module in FACE:
        return 99
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANKS:
        return RANKS[parts[1]]
    return SHARED


def known_modules(root: Path) -> set[str]:
    """Every module and package name under root's twotower/ and reference/."""
    files = [*(root / "twotower").rglob("*.py"), *(root / "reference").rglob("*.py")]
    return {module_name(path, root) for path in files}


def imported_modules(path: Path, root: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in a file, relative ones resolved.

    `from twotower import faults` counts as importing twotower.process.faults, not the package root.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return found


ALLOWED_IN_REFERENCE = ("numpy", "__future__", "reference", "typing", "collections")


def violations(root: Path = ROOT) -> list[str]:
    """One line per import that points up the ranks, or out of the reference's numpy-only world."""
    known = known_modules(root)
    bad = []
    for path in sorted([*(root / "twotower").rglob("*.py"), *(root / "reference").rglob("*.py")]):
        here = module_name(path, root)
        for line, target in imported_modules(path, root, known):
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if rank(here) == REFERENCE:
                if target.split(".")[0] not in ALLOWED_IN_REFERENCE:
                    bad.append(f"{where}: reference/ may import numpy only")
            elif target in ("twotower", "twotower.cli"):
                if here not in FACE:
                    bad.append(f"{where}: only the face imports the package root or the CLI")
            elif target in known and rank(target) > rank(here):
                bad.append(f"{where}: rank {rank(here)} must not import rank {rank(target)}")
            elif here.startswith(TRAINING_PARTS) and target in LOOP:
                bad.append(f"{where}: training's parts must not import the loop")
    return bad


def test_no_part_imports_a_higher_one() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("here", "source", "complaint"),
    [
        (
            "twotower/miners/x.py",
            "from twotower.training.negatives.queue import MemoryQueue",
            "rank 2",
        ),
        ("twotower/data/x.py", "import twotower.guard.supervisor", "rank 2"),
        ("twotower/training/x.py", "from twotower.guard import forensics", "rank 4"),
        ("twotower/training/x.py", "from twotower.serve.load import load_tower", "rank 4"),
        (
            "twotower/run/x.py",
            "from twotower.training.negatives.queue import MemoryQueue",
            "rank 3",
        ),
        ("twotower/miners/x.py", "from twotower.run.rundir import RunDir", "rank 2"),
        ("twotower/backends/x.py", "from twotower import cli", "only the face"),
        ("twotower/config.py", "from twotower.diagnose.doctor import diagnose", "rank 1"),
        ("reference/x.py", "import torch", "numpy only"),
        ("reference/x.py", "from twotower.batch import Batch", "numpy only"),
    ],
)
def test_the_check_catches_an_upward_import(
    here: str, source: str, complaint: str, tmp_path: Path
) -> None:
    """A negative control: the same walk over a copy of the tree with one bad import planted."""
    copy = tmp_path / "tree"
    for folder in ("twotower", "reference"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / here
    planted.write_text((planted.read_text() if planted.exists() else "") + "\n" + source + "\n")
    found = violations(copy)
    assert len(found) == 1, found
    assert found[0].startswith(here) and complaint in found[0]


TOP_LEVEL_LIMIT = 16  # past this the shared layer stops being a short list a newcomer can hold


def test_the_top_of_the_package_stays_short() -> None:
    top = sorted(path.name for path in (ROOT / "twotower").glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, top


def test_no_test_module_imports_another(tmp_path: Path) -> None:
    """What tests share lives in helper modules (tests/datasets.py, processes.py, runs.py, ...);
    a test module importing another would run (and couple to) that module's tests. With a
    negative control: one such import planted in a copy is found."""

    def imports_of_test_modules(folder: Path) -> list[str]:
        found = []
        for path in sorted(folder.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in getattr(node, "names", [])]
                if isinstance(node, ast.Import | ast.ImportFrom) and any(
                    name.startswith("tests.test_") for name in names
                ):
                    found.append(f"{path.name}:{node.lineno}")
        return found

    assert imports_of_test_modules(ROOT / "tests") == []
    copy = tmp_path / "tests"
    shutil.copytree(ROOT / "tests", copy, ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "test_atomic.py"
    planted.write_text(planted.read_text() + "\nfrom tests.test_queue import DIM\n")
    assert len(imports_of_test_modules(copy)) == 1


MODULE_LIMIT = 500  # lines; past ~400 a module usually holds two ideas


def too_long(root: Path = ROOT, limit: int = MODULE_LIMIT) -> list[str]:
    """'path: N lines' for every .py under root's twotower/ and reference/ longer than limit."""
    files = sorted([*(root / "twotower").rglob("*.py"), *(root / "reference").rglob("*.py")])
    counts = {path: len(path.read_text().splitlines()) for path in files}
    return [f"{path.relative_to(root)}: {n} lines" for path, n in counts.items() if n > limit]


def test_no_module_is_too_long_to_read() -> None:
    assert too_long() == []


def test_the_length_check_catches_a_long_module(tmp_path: Path) -> None:
    """A negative control: a copy of the tree with one module grown past the limit."""
    copy = tmp_path / "tree"
    for folder in ("twotower", "reference"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    grown = copy / "twotower" / "training" / "step.py"
    grown.write_text(grown.read_text() + "\n" * MODULE_LIMIT)
    assert too_long(copy) == [
        f"twotower/training/step.py: {len(grown.read_text().splitlines())} lines"
    ]


FOLDER_LIMIT = 15  # modules; past this a folder holds several parts


def crowded_folders(root: Path = ROOT, limit: int = FOLDER_LIMIT) -> list[str]:
    """'folder: N modules' for every folder of root's twotower/ with more than limit modules."""
    folders = {path.parent for path in (root / "twotower").rglob("*.py")}
    counts = {d: len([p for p in d.glob("*.py") if p.name != "__init__.py"]) for d in folders}
    return [f"{d.relative_to(root)}: {n} modules" for d, n in sorted(counts.items()) if n > limit]


def test_no_folder_holds_more_than_one_part(tmp_path: Path) -> None:
    assert crowded_folders() == []
    copy = tmp_path / "tree" / "twotower" / "run"  # negative control: one module too many
    copy.mkdir(parents=True)
    for i in range(FOLDER_LIMIT + 1):
        (copy / f"m{i}.py").write_text("")
    assert crowded_folders(tmp_path / "tree") == [f"twotower/run: {FOLDER_LIMIT + 1} modules"]


FUNCTION_LIMIT = 80  # lines; past this a function usually does two things


def long_functions(root: Path = ROOT, limit: int = FUNCTION_LIMIT) -> list[str]:
    """'path:line name (N lines)' for every function of root's twotower/ and reference/ longer
    than limit, nested ones included."""
    found = []
    for path in sorted([*(root / "twotower").rglob("*.py"), *(root / "reference").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    found.append(f"{where} {node.name} ({lines} lines)")
    return found


def test_no_function_is_too_long_to_hold_in_ones_head(tmp_path: Path) -> None:
    assert long_functions() == []
    planted = tmp_path / "tree" / "twotower" / "long.py"  # negative control: 81 lines
    planted.parent.mkdir(parents=True)
    (tmp_path / "tree" / "reference").mkdir()
    planted.write_text("def f():\n" + "    x = 1\n" * (FUNCTION_LIMIT - 1) + "    return x\n")
    assert long_functions(tmp_path / "tree") == [
        f"twotower/long.py:1 f ({FUNCTION_LIMIT + 1} lines)"
    ]

"""Phase names have one home (twotower.process.phase.Phase): no call that names a phase (a phase
point, a heartbeat phase, a progress task, a fault point) spells one as a string literal."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from twotower.process.faults import PHASES
from twotower.process.phase import INJECTABLE, MINER_PHASES, Phase

ROOT = Path(__file__).resolve().parent.parent
NAMING_CALLS = {"enter", "name_phase", "task", "point"}  # their first argument is a phase


def spelled_phases(package: Path) -> list[str]:
    """'path:line name' for each naming call whose first argument is a literal phase name."""
    names = {phase.value for phase in Phase}
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            first = node.args[0] if node.args else None
            literal = isinstance(first, ast.Constant) and first.value in names
            if node.func.attr in NAMING_CALLS and literal:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} {first.value}")
    return found


def test_no_phase_is_spelled_outside_its_enum(tmp_path: Path) -> None:
    assert spelled_phases(ROOT / "twotower") == []
    copy = tmp_path / "twotower"  # negative control: one literal planted in a copy is found
    shutil.copytree(ROOT / "twotower", copy, ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "training" / "trainer.py"
    planted.write_text(planted.read_text() + '\n\ndef f(points):\n    points.enter("mine", 0)\n')
    line = len(planted.read_text().splitlines())
    assert spelled_phases(copy) == [f"twotower/training/trainer.py:{line} mine"]


def test_the_fault_switch_and_the_blame_read_the_same_names() -> None:
    """Each injectable phase and each miner phase is a Phase, written as the user writes it."""
    assert PHASES == ("load", "build-index", "encode", "mine", "step", "checkpoint")
    assert {phase.value for phase in INJECTABLE} <= {phase.value for phase in Phase}
    assert {str(phase) for phase in MINER_PHASES} == {"mine", "build-index", "load-index", "search"}
    assert f"{Phase.BUILD_INDEX}" == "build-index" and Phase("search") is Phase.SEARCH

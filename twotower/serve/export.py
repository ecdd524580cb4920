"""`twotower export`: a run's checkpoint as a self-contained tower directory.

The directory (see `tower_dir`) loads without the run, the dataset or the trainer.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from twotower.atomic import replace_dir, temporary_beside
from twotower.errors import UsageError
from twotower.run.settings import read_settings
from twotower.serve.tower_dir import (
    TOWER_JSON,
    TowerFiles,
    write_tower_files,
)
from twotower.towers import TowerSpec
from twotower.training.checkpoint import (
    CheckpointError,
    choose_checkpoint,
    describe_choice,
    load_checkpoint,
)

FORMATS = ("safetensors", "torch", "onnx")


# what decides a run's held-out rows (evaluation.heldout.held_out), kept so `encode --rows` agrees
SPLIT_SETTINGS = ("eval_fraction", "max_eval", "seed", "eval_split", "eval_data")


def say_checkpoint(files: TowerFiles) -> None:
    """On stderr, the lines `describe_choice` says of the run's checkpoint a command took (the
    default is best/ where the run kept one, so the user sees which, and when it is untrained)."""
    source = files.doc["source"]
    for line in describe_choice(source["run"], source["checkpoint"], int(source["step"])):
        print(f"twotower: {line}", file=sys.stderr, flush=True)


def tower_from_run(run: str | os.PathLike[str], checkpoint: str | None = None) -> TowerFiles:
    """A run's tower at --checkpoint best|latest|step-N (None: best/ where the run kept one,
    else latest; see `choose_checkpoint`): spec from config.json, dim and parameters from the
    checkpoint, and the run's held-out split settings."""
    run = Path(run)
    settings = read_settings(run)  # as the version that wrote it meant
    try:
        checkpoint, source = choose_checkpoint(run, checkpoint)
        meta, state = load_checkpoint(source)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    kind = settings.get("tower", "gru")
    if kind == "gru":
        dim = int(state["gru.weight_ih_l0"].shape[1])
    else:
        dim = int(state["proj.weight"].shape[0])
    spec = TowerSpec(
        kind=kind,
        dim=dim,
        hidden=int(settings.get("hidden", dim)) if kind == "gru" else dim,
        layers=int(settings.get("layers", 1)),
        proj=bool(settings.get("proj", True)),
        residual=str(settings["residual"]),
    )
    params = {name: state[name] for name in spec.shapes() if name in state}
    spec.check_state(params)
    doc = {
        "data": settings.get("data"),
        "source": {"run": str(run.resolve()), "checkpoint": checkpoint, "step": meta.get("step")},
        "split": {key: settings.get(key) for key in SPLIT_SETTINGS},
    }
    return TowerFiles(run, spec, params, doc)


def export_tower(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: str | None = None,
    format: str = "safetensors",
) -> Path:
    """Export `run`'s checkpoint (`tower_from_run`; named in one line on stderr) to directory
    `out`; returns `out`.

    tower.json and tower.safetensors always; format "torch" adds tower.pt (a torch state
    dict), "onnx" adds tower.onnx (needs `pip install twotower[onnx]`). The directory is
    built under a temporary name and renamed into place; an earlier export at `out` is
    replaced, any other existing path refused.
    """
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not (out / TOWER_JSON).is_file() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not an exported tower; choose another --out")
    tower = tower_from_run(run, checkpoint)
    say_checkpoint(tower)
    tmp = temporary_beside(out)  # a directory: renamed by hand below, over an earlier export
    shutil.rmtree(tmp, ignore_errors=True)
    extra_files = {"torch": ["tower.pt"], "onnx": ["tower.onnx"]}.get(format, [])
    try:
        write_tower_files(tmp, tower.spec, tower.params, extra_files=extra_files, **tower.doc)
        if format != "safetensors":
            from twotower.serve.torch_tower import save_extra

            save_extra(tmp, tower.spec, tower.params, format)
        replace_dir(tmp, out)  # an earlier export is swapped out, never deleted first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

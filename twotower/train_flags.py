"""`twotower train`'s flags: one for each TrainConfig field, grouped by topic, each help
ending with its default; and how --demo's settings, a run's config.json (--resume), a --config
file and the flags given layer into one TrainConfig.

Part of the face, like cli.py (which builds the other sub-commands' parsers by hand).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from twotower.config import TrainConfig, default_out
from twotower.config_files import read_config_file
from twotower.errors import UsageError
from twotower.knobs import default_text
from twotower.run.settings import SETTINGS_NAME, resumed_settings

LIST_FIELDS = {"fallback", "miner_fallback"}

# `twotower train --help`, by topic: every TrainConfig field in one group, in this order
# (tests/test_cli.py checks that none is missing).
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data", "demo"),
    "model": ("tower", "proj", "residual", "hidden", "layers"),
    "recipe": (
        "steps",
        "epochs",
        "batch_size",
        "temperature",
        "lr",
        "lr_schedule",
        "warmup_steps",
        "warmup_share",
        "weight_decay",
        "max_grad_norm",
        "seed",
    ),
    "negatives and mining": (
        "hard_negatives",
        "mine_every",
        "mine_scope",
        "mine_lead",
        "mine_pool",
        "mine_skip",
        "absolute_margin",
        "relative_margin",
        "max_score",
        "queue_size",
        "bank_negatives",
        "sampled_negatives",
        "logq",
        "exclude_context",
        "mine_overlap",
        "mine_probe",
        "min_mining_recall",
        "faiss_index",
        "faiss_nprobe",
        "faiss_ef_search",
        "faiss_ef_construction",
        "faiss_train_rows",
        "faiss_target_recall",
        "hnswlib_m",
        "hnswlib_ef_construction",
        "hnswlib_ef",
    ),
    "evaluation": (
        "eval_every",
        "eval_fraction",
        "max_eval",
        "eval_split",
        "eval_data",
        "select_metric",
        "patience",
        "eval_miner",
    ),
    "engines and threads": (
        "backend",
        "fallback",
        "gru_path",
        "deterministic",
        "threads",
        "miner",
        "miner_fallback",
        "miner_isolation",
        "miner_threads",
        "miner_timeout",
    ),
    "run and checkpoints": ("out", "resume", "checkpoint_every", "keep_checkpoints", "tensorboard"),
    "guard": ("supervise", "max_restarts", "hang_timeout", "keep_core", "collective_timeout"),
}
# The value a flag takes, where its type alone says too little.
METAVARS = {
    "data": "DIR|FILE.npz",
    "out": "RUN",
    "eval_data": "DIR|FILE.npz",
    "tensorboard": "DIR",
    "tower": "gru|meanpool",
    "residual": "none|last",
    "backend": "ENGINE",
    "miner": "ENGINE",
    "eval_miner": "ENGINE",
    "gru_path": "packed|masked",
    "miner_isolation": "process|none",
    "mine_scope": "upcoming|all",
    "lr_schedule": "constant|linear|cosine",
    "eval_split": "auto|random|group",
    "select_metric": "METRIC",
    "faiss_index": "FACTORY",
}
TRAIN_USAGE = "twotower train (--data DIR|FILE.npz | --demo | --resume) [--out RUN] [options]"
TRAIN_EXAMPLES = """examples:
  twotower train --demo --out runs/demo            built-in data, about half a minute
  twotower train --data DIR --out runs/mine        your dataset, the default recipe
  twotower train --out runs/mine --resume          continue it, with its own settings
  twotower train --out runs/mine --resume --backend numpy   ... on another engine"""


def parse_list(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']: a flag's comma-separated list."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _field_type(annotation: str) -> tuple[Callable[[str], Any], str]:
    """A field's annotation -> (the parser of its flag's value, the value's default metavar)."""
    base = annotation.replace(" | None", "")
    return {"int": (int, "N"), "float": (float, "X"), "str": (str, "NAME")}[base]


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def field_default(name: str) -> Any:
    """TrainConfig field `name`'s default value (what a flag not given means in training)."""
    return _field_default(_FIELDS[name])


def _field_default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_field_flags(
    group: Any, name: str, note: str = "", default: Any = argparse.SUPPRESS
) -> None:
    """The flag (and for a switch, its --no- flag) of TrainConfig field `name`, on `group` (a
    parser or an argument group): its help followed by `note` and a default. default=SUPPRESS
    (train's): only the flags given are set, and the help shows the field's default; another
    value is the namespace's default and the help shows it, None showing nothing (the note
    says what an unset flag means)."""
    f = _FIELDS[name]
    flag = "--" + f.name.replace("_", "-")
    no_flag = "--no-" + f.name.replace("_", "-")
    shown = _field_default(f) if default is argparse.SUPPRESS else default
    help_text = f.metadata["help"] + note
    if shown is not None:
        help_text += f" Default: {default_text(shown)}."
    if f.type in ("bool", "bool | None"):
        group.add_argument(flag, action="store_true", default=default, help=help_text)
        if "no_help" in f.metadata:
            group.add_argument(
                no_flag,
                dest=f.name,
                action="store_false",
                default=default,
                help=f.metadata["no_help"],
            )
    elif f.name in LIST_FIELDS:
        group.add_argument(flag, type=parse_list, default=default, metavar="A,B", help=help_text)
    else:
        kind, metavar = _field_type(str(f.type))
        group.add_argument(
            flag,
            type=kind,
            default=default,
            metavar=METAVARS.get(f.name, metavar),
            help=help_text,
        )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (dashes for underscores), grouped by FLAG_GROUPS, each
    help ending with the field's default; only the flags given are set."""
    from twotower.training.demo import DEMO_SETTINGS

    demo = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_SETTINGS.items())
    notes = {"demo": f" Its settings, each overridden by a flag given: {demo}."}
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            add_field_flags(group, name, notes.get(name, ""))
        if title == "run and checkpoints":
            group.add_argument(
                "--config",
                metavar="FILE.toml",
                help="A settings file (TOML or JSON, keys as the flags); flags given beside it "
                "override it.",
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --demo's settings < the run's config.json (with --resume) < a --config file
    < flags on the command line.

    With --resume, RUN/config.json supplies every setting the run was started with, so
    `twotower train --out RUN --resume` continues it as it was; a setting given beside it that
    would change the numbers is refused by the trainer, naming it.
    """
    from twotower.training.demo import DEMO_SETTINGS

    given = {name: value for name, value in vars(args).items() if name in TrainConfig.field_names()}
    from_file = read_config_file(args.config) if args.config else {}
    asked = {**from_file, **given}
    stored = _resumed_settings(asked) if asked.get("resume") else {}
    demo = asked.get("demo", stored.get("demo", False))
    values = {**(DEMO_SETTINGS if demo else {}), **stored, **asked}
    return TrainConfig.from_dict(values, source=args.config or "command line")


def _resumed_settings(asked: dict[str, Any]) -> dict[str, Any]:
    """What --resume continues with: the settings of RUN/config.json and RUN itself ({} when
    RUN holds no config.json and the command names the data: a run that starts afresh)."""
    out = asked.get("out") or default_out()
    if (Path(out) / SETTINGS_NAME).is_file():
        return {**resumed_settings(out), "out": out}
    if asked.get("data") is None and not asked.get("demo"):
        if not asked.get("out"):
            raise UsageError("--resume needs --out RUN: the run directory to continue")
        raise UsageError(
            f"--resume: {out} holds no run to continue (no config.json); "
            "start one with --data DIR|FILE.npz or --demo"
        )
    return {}

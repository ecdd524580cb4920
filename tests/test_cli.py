"""The command line: bad input is one line and exit code 2, and never touches an earlier run."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from tests.datasets import BROKEN_DATASETS, small_arrays, write_dir
from tests.processes import run_twotower
from twotower import backends, miners
from twotower.cli import main
from twotower.config import TrainConfig
from twotower.run.settings import resumed_settings

FAST = (
    "--no-supervise",
    "--backend",
    "numpy",
    "--hidden",
    "8",
    "--batch-size",
    "8",
    "--max-eval",
    "10",
)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with checkpoints that later bad invocations must leave alone."""
    root = tmp_path_factory.mktemp("earlier")
    data = write_dir(root / "data", small_arrays())
    out = root / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "3", *FAST]) == 0
    assert (out / "checkpoints" / "LATEST").exists()
    return out


@pytest.mark.parametrize(
    ("case", "make", "expected"), BROKEN_DATASETS, ids=[c[0] for c in BROKEN_DATASETS]
)
def test_bad_dataset_is_one_line_exit_2_and_touches_no_checkpoint(
    earlier_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    make,
    expected: str,
) -> None:
    before = tree_digest(earlier_run)
    data = make(tmp_path)
    code = main(["train", "--data", str(data), "--out", str(earlier_run), "--resume", *FAST])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("twotower: error: ") and expected in lines[0]
    assert tree_digest(earlier_run) == before


def test_bad_input_in_a_real_process_has_no_traceback(earlier_run: Path, tmp_path: Path) -> None:
    _, make, expected = BROKEN_DATASETS[0]
    before = tree_digest(earlier_run)
    result = run_twotower(
        "train", "--data", str(make(tmp_path)), "--out", str(earlier_run), "--resume", *FAST
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twotower: error: ") and expected in lines[0]
    assert tree_digest(earlier_run) == before


def test_a_fresh_run_will_not_overwrite_an_earlier_one(earlier_run: Path, capsys) -> None:
    data = earlier_run.parent / "data"
    before = tree_digest(earlier_run)
    assert main(["train", "--data", str(data), "--out", str(earlier_run), *FAST]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert tree_digest(earlier_run) == before


CHANGED = {
    "lr": (["--lr", "0.5"], "lr: 0.001 -> 0.5"),
    "schedule": (["--lr-schedule", "constant"], "lr_schedule: 'cosine' -> 'constant'"),
    "warmup": (["--warmup-steps", "5"], "warmup_steps: None -> 5"),
    "share": (["--warmup-share", "0.1"], "warmup_share: 0.05 -> 0.1"),
    "masking": (["--no-exclude-context"], "exclude_context: True -> False"),
    "residual": (["--residual", "none"], "residual: 'last' -> 'none'"),
}


@pytest.mark.parametrize(("flags", "expected"), CHANGED.values(), ids=CHANGED.keys())
def test_resume_with_settings_that_change_the_numbers_is_refused(
    earlier_run: Path, capsys, flags: list[str], expected: str
) -> None:
    data = earlier_run.parent / "data"
    before = tree_digest(earlier_run)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(earlier_run),
                "--resume",
                *FAST,
                *flags,
            ]
        )
        == 2
    )
    assert expected in capsys.readouterr().err
    assert tree_digest(earlier_run) == before


def test_unavailable_backend_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    data = write_dir(tmp_path / "data", small_arrays())
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *FAST, "--backend", "torch-mps"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err.startswith("twotower: error: torch-mps is not available here")
        and "available: numpy" in err
    )
    assert not out.exists()


def test_config_file_is_read_and_flags_override_it(tmp_path: Path) -> None:
    from twotower.cli import build_parser, config_from_args

    settings = tmp_path / "run.toml"
    settings.write_text('data = "d"\nbatch-size = 64\nlr = 0.01\nfallback = ["numpy"]\n')
    args = build_parser().parse_args(
        ["train", "--config", str(settings), "--lr", "0.02", "--no-supervise"]
    )
    config = config_from_args(args)
    assert (config.data, config.batch_size, config.lr, config.supervise) == ("d", 64, 0.02, False)
    assert TrainConfig.from_dict(__import__("json").loads(config.to_json())) == config


def test_config_file_with_an_unknown_key_is_a_usage_error(tmp_path: Path, capsys) -> None:
    settings = tmp_path / "run.toml"
    settings.write_text('data = "d"\nlearning_rate = 0.01\n')
    assert main(["train", "--config", str(settings)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"twotower: error: {settings}: unknown setting(s) learning_rate"
    )


def test_backends_lists_every_engine_with_its_reason(capsys) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for registry in (backends, miners):
        for info in registry.describe():
            line = next(line for line in out.splitlines() if line.startswith(info.name + " "))
            assert ("yes" if info.available else "no") in line.split() and info.reason in line


def test_exclude_context_without_context_ids_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    data = write_dir(tmp_path / "data", small_arrays("contexts"))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *FAST, "--exclude-context"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "--exclude-context needs the bank ids of the context items (context_ids.npy)" in err
    assert not out.exists()


def train_parser() -> argparse.ArgumentParser:
    from twotower.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]


def test_every_train_flag_sits_in_one_topic_group() -> None:
    from twotower.train_flags import FLAG_GROUPS

    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(TrainConfig.field_names())  # each once, none missing
    titles = [group.title for group in train_parser()._action_groups]
    assert [t for t in titles if t in FLAG_GROUPS] == list(FLAG_GROUPS)


def test_help_shows_the_default_of_every_flag_that_has_one() -> None:
    """Each flag's help is sentences ending with its default; `train --help` prints them all."""
    from twotower.train_flags import default_text

    helps = {
        option: action.help or ""
        for action in train_parser()._actions
        for option in action.option_strings
    }
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = helps[flag]
        assert text[:1].isupper() and text.endswith("."), (flag, text)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is not None:
            assert text.endswith(f"Default: {default_text(default)}."), (flag, text)
    assert helps["--hidden"].endswith("Default: 768.")
    assert helps["--fallback"].endswith("Default: numpy.")
    assert helps["--no-proj"].startswith("Meanpool without a projection")
    printed = run_twotower("train", "--help").stdout
    assert "Default: 500." in printed and "negatives and mining:" in printed
    assert "twotower train --out runs/mine --resume" in printed


def test_resume_takes_every_setting_from_the_runs_config(earlier_run: Path) -> None:
    from twotower.cli import build_parser, config_from_args

    stored = json.loads((earlier_run / "config.json").read_text())
    args = ["train", "--out", str(earlier_run), "--resume"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.out, config.resume, config.supervise) == (str(earlier_run), True, True)
    for name in set(TrainConfig.field_names()) - {"out", "resume", "supervise"}:
        assert getattr(config, name) == stored[name], name
    # flags beside it override; the trainer refuses those that change the numbers
    engine = config_from_args(build_parser().parse_args([*args, "--backend", "torch-cpu"]))
    assert (engine.backend, engine.hidden) == ("torch-cpu", stored["hidden"])


def test_resume_continues_with_nothing_but_out(earlier_run: Path, capsys) -> None:
    """The stored run planned 3 steps at a cosine rate: a resume that asks for 5 is refused,
    naming the setting; one with no setting beside it finishes (nothing left to train)."""
    before = tree_digest(earlier_run)
    resume = ["train", "--out", str(earlier_run), "--resume", "--no-supervise"]
    assert main([*resume, "--steps", "5"]) == 2
    assert "steps: 3 -> 5" in capsys.readouterr().err
    assert tree_digest(earlier_run) == before
    assert main(resume) == 0
    assert "resumed from step-0000003" in capsys.readouterr().err


def test_resume_of_a_run_that_is_not_there_says_so(tmp_path: Path, capsys) -> None:
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"twotower: error: --resume: {tmp_path / 'none'} holds no run to continue "
        "(no config.json); start one with --data DIR|FILE.npz or --demo"
    )
    assert not (tmp_path / "none").exists()
    assert main(["train", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        "twotower: error: --resume needs --out RUN: the run directory to continue"
    )


def test_resume_reads_an_old_config_as_the_run_it_was(tmp_path: Path) -> None:
    """A config.json from before an option existed resumes as that run did (ABSENT_MEANS);
    one with an option since removed still resumes."""
    old = TrainConfig(data="d", steps=10).to_dict()
    del old["lr_schedule"], old["mine_lead"]
    old["an_option_since_removed"] = 1
    (tmp_path / "config.json").write_text(json.dumps(old))
    stored = resumed_settings(tmp_path)
    assert (stored["lr_schedule"], stored["mine_lead"]) == ("constant", 0)
    assert not {"out", "resume", "supervise", "an_option_since_removed"} & set(stored)
    assert TrainConfig.from_dict(stored).numeric_differences(old) == []


@pytest.mark.parametrize("command", ["eval", "export", "report", "replay"])
def test_a_run_that_is_not_there_names_the_runs_nearby(tmp_path: Path, command: str) -> None:
    """A user who follows a tour to runs/demo after a run went to runs/<time> is told, in one
    line with exit code 2, which runs exist (newest first), not only that the name is wrong."""
    for name, when in (("20261207-101500", 1_000), ("20261207-111500", 2_000)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text("{}")
        os.utime(tmp_path / "runs" / name / "config.json", (when, when))
    (tmp_path / "runs" / "not-a-run").mkdir()
    extra = {"export": ["--out", "tower"], "replay": ["--step", "1"]}.get(command, [])
    result = run_twotower(command, "--run", "runs/demo", *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "twotower: error: runs/demo: does not exist, so it is no twotower run directory; "
        "runs nearby: runs/20261207-111500, runs/20261207-101500"
    ]


OWN_MEANING = {"eval": ("data",), "search": ("data", "exclude_context", "out")}


@pytest.mark.parametrize("command", ["eval", "search"])
def test_eval_and_search_flags_that_mirror_a_field_say_what_the_field_says(command: str) -> None:
    """A flag of eval or search that sets a TrainConfig field is made from that field (its help
    first), so the two cannot drift apart; --data alone means something of its own there (the
    dataset to score, by default the run's), and so does search's --exclude-context (off unless
    asked: a search returns what it is asked for, where training masks by default) and its --out
    (the .npz it writes)."""
    from twotower.cli import build_parser

    helps = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    mirrored = [
        action
        for action in sub.choices[command]._actions
        if action.dest in helps
        and action.dest not in OWN_MEANING.get(command, ())
        and action.option_strings[0][2:5] != "no-"
    ]
    assert {action.dest for action in mirrored} >= {"miner", "backend"}
    for action in mirrored:
        assert action.help.startswith(helps[action.dest]), (action.dest, action.help)

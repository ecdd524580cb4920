"""Defaults that depend on the data or on the tower resolve from it and are recorded; a
config.json written before an option existed is read as what that run did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.datasets import small_arrays, write_dir
from twotower.config import TrainConfig
from twotower.errors import UsageError
from twotower.training.resolved import resolved_copy
from twotower.training.trainer import train


@pytest.mark.parametrize(("layout", "masking"), [("ids", True), ("contexts", False)])
def test_masking_is_on_by_default_exactly_when_the_data_has_context_ids(
    tmp_path: Path, layout: str, masking: bool
) -> None:
    data = write_dir(tmp_path / "data", small_arrays(layout))
    out = tmp_path / "run"
    config = TrainConfig(
        data=str(data), out=str(out), backend="numpy", hidden=8, steps=2, supervise=False
    )
    assert config.exclude_context is None  # decided by the data
    train(config)
    assert config.exclude_context is None  # in a new copy: the caller's config is frozen
    stored = json.loads((out / "config.json").read_text())
    assert stored["exclude_context"] is masking
    has = "has" if masking else "has no"
    now = "on" if masking else "off"
    said = f"seen-item masking: --exclude-context unset -> {now}, since the data {has} context"
    assert said in (out / "log.txt").read_text()
    assert stored["lr_schedule"] == "cosine" and stored["warmup_share"] == 0.05
    assert TrainConfig(data="d", exclude_context=False).for_data(True).exclude_context is False


def test_a_config_is_frozen_and_a_resolved_copy_is_validated_again() -> None:
    config = TrainConfig(data="d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hard_negatives = 0  # type: ignore[misc]
    copy = resolved_copy(config, "bank negatives: full", "why", hard_negatives=0, queue_size=0)
    assert (copy.config.hard_negatives, config.hard_negatives) == (0, 8)
    assert copy.line == (
        "bank negatives: full: --hard-negatives 8 -> 0 and --queue-size 4096 -> 0, since why"
    )
    assert resolved_copy(config, "nothing", "why", hard_negatives=8).line is None
    with pytest.raises(UsageError, match="--queue-size must be >= 0, got -1"):
        resolved_copy(config, "bad", "why", queue_size=-1)


def test_a_config_from_before_the_options_reads_as_the_old_recipe() -> None:
    """Keys a config.json lacks mean what such a run did: a constant rate, a random split, no
    masking; so resuming it under today's defaults is refused, not silently changed."""
    old = TrainConfig(data="d", steps=10).to_dict()
    for key in ("lr_schedule", "warmup_share", "eval_split", "exclude_context", "residual"):
        del old[key]
    today = TrainConfig(data="d", steps=10).for_data(True)
    differences = today.numeric_differences(old)
    assert "residual: 'none' -> 'last'" in differences
    assert "lr_schedule: 'constant' -> 'cosine'" in differences
    assert "eval_split: 'random' -> 'auto'" in differences
    assert "exclude_context: False -> True" in differences
    plain = TrainConfig(
        data="d",
        steps=10,
        lr_schedule="constant",
        warmup_share=0.0,
        eval_split="random",
        exclude_context=False,
        residual="none",
    )
    assert plain.numeric_differences(old) == []


def test_the_gru_defaults_to_the_residual_tower_and_meanpool_to_none() -> None:
    """--residual unset resolves by tower (last for gru, none for meanpool) before the config
    is hashed or written; a value given is kept, and last on meanpool is refused."""
    assert TrainConfig(data="d").residual == "last"
    assert TrainConfig(data="d", residual="none").residual == "none"
    assert TrainConfig(data="d", tower="meanpool").residual == "none"
    assert (
        TrainConfig(data="d").numeric_hash()
        == TrainConfig(data="d", residual="last").numeric_hash()
    )
    with pytest.raises(UsageError, match="--residual is a gru option"):
        TrainConfig(data="d", tower="meanpool", residual="last")

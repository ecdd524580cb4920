"""The run directory's typed records (twotower/run/records.py) read what older versions wrote.

Golden files under tests/fixtures/old_runs/, written by the code of 737aff3^ (a numpy run of 6
steps, hard negatives mined at step 3): `meta-before-selection.json`, a checkpoint's meta.json
from before `selection`, `mining` and `search_params` existed, and
`heartbeat-before-version.json`, a beat from before it carried `format_version`.
"""

from __future__ import annotations

import json
from pathlib import Path

from twotower.run.heartbeat import Heartbeat, read_beat
from twotower.run.records import CHECKPOINT_FORMAT, CheckpointMeta
from twotower.training.evaluation.selection import Selection

FIXTURES = Path(__file__).parent / "fixtures" / "old_runs"


def test_an_old_checkpoint_meta_reads_as_it_meant() -> None:
    raw = json.loads((FIXTURES / "meta-before-selection.json").read_text())
    assert not {"selection", "mining", "search_params"} & set(raw)  # the golden file is old
    meta = CheckpointMeta.from_dict(raw)
    assert (meta.step, meta.epoch, meta.backend, meta.miner) == (6, 0, "numpy", "exact")
    assert meta.format_version == CHECKPOINT_FORMAT == raw["format_version"]
    assert meta.mined_table == "table-step-0000003.npy"
    assert meta.metrics["mrr@100"] == raw["metrics"]["mrr@100"]
    assert set(meta.arrays) == set(raw["arrays"])
    # what such a checkpoint meant: no refresh in flight, no raised search parameters, and
    # no selection, so the resumed run starts a fresh one
    assert (meta.mining, meta.search_params, meta.selection) == (None, {}, None)
    assert Selection.restore("mrr@100", meta.selection).best_step is None


def test_meta_fields_round_trip_through_what_the_trainer_saves() -> None:
    meta = CheckpointMeta(
        14,
        epoch=1,
        backend="numpy",
        mined_table="table-step-0000010.npy",
        metrics={"mrr@100": 0.25},
        mining={"take": 12, "use": 16, "queries": "queries-step-0000012.npy"},
    )
    saved = {"format_version": CHECKPOINT_FORMAT, "step": 14, **meta.caller_fields()}
    assert CheckpointMeta.from_dict(json.loads(json.dumps(saved))) == meta
    assert "mining" not in CheckpointMeta(3).caller_fields()  # none in flight: no key


def test_an_old_heartbeat_and_a_new_one_read_as_beats(tmp_path: Path) -> None:
    old = read_beat(FIXTURES / "heartbeat-before-version.json")
    raw = json.loads((FIXTURES / "heartbeat-before-version.json").read_text())
    assert "format_version" not in raw
    assert old is not None and (old.pid, old.step, old.phase) == (raw["pid"], 6, "checkpoint")
    assert old.format_version == 1 and old.extra["threads"] == raw["threads"]
    heartbeat = Heartbeat(tmp_path / "heartbeat.json")
    heartbeat.describe(threads={"trainer": 1})
    written = heartbeat.beat(4, "step", backend="numpy", miner="exact", progress="3/9")
    doc = json.loads((tmp_path / "heartbeat.json").read_text())
    assert (doc["format_version"], doc["step"], doc["progress"], doc["threads"]) == (
        1,
        4,
        "3/9",
        {"trainer": 1},
    )
    assert read_beat(tmp_path / "heartbeat.json") == written
    (tmp_path / "heartbeat.json").write_text("{")  # torn: as if never written
    assert read_beat(tmp_path / "heartbeat.json") is None

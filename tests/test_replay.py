"""`twotower replay`: a step between checkpoints, with a mining between, rebuilt exactly (the
logged batch and loss) and agreeing across engines; a pruned mined table mined again; a
corrupted checkpoint with a repaired checksum detected (negative control); a batch that is
not the logged one refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from twotower import backends
from twotower.cli import main
from twotower.config import TrainConfig
from twotower.data import synthesize
from twotower.diagnose.replay import replay
from twotower.run.rundir import read_metrics
from twotower.training.checkpoint import load_checkpoint
from twotower.training.trainer import train

STEP = 22  # between checkpoints 16 and 24, after the mining at step 20
SETTINGS = dict(
    steps=30,
    batch_size=16,
    hidden=12,
    hard_negatives=3,
    mine_every=10,
    mine_pool=6,
    queue_size=40,  # not a multiple of B: the ring wraps mid-batch
    checkpoint_every=8,
    keep_checkpoints=10,
    max_eval=40,
    supervise=False,
)
ENGINES = [name for name in ("numpy", "torch-cpu") if name in backends.available()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 30-step run per engine: checkpoints 8, 16, 24, 30; minings at 10 and 20."""
    root = tmp_path_factory.mktemp("replay")
    data = synthesize(root / "data", samples=300, bank=300, dim=16, seq_len=6, seed=1)
    out = {}
    for engine in ENGINES:
        config = TrainConfig(
            data=str(data.path), out=str(root / engine), backend=engine, **SETTINGS
        )
        assert train(config).exit_code == 0
        out[engine] = root / engine
    return out


def logged(run: Path, step: int) -> dict:
    """metrics.jsonl's record of step `step` (steps done before it), read here on our own."""
    records = read_metrics(run / "metrics.jsonl")
    return next(r for r in records if r["event"] == "step" and r["step"] == step + 1)


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_step_between_checkpoints_is_rebuilt_and_every_engine_agrees(
    runs: dict[str, Path], engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs[engine]
    assert main(["replay", "--run", str(run), "--step", str(STEP)]) == 0
    out = capsys.readouterr().out
    record = logged(run, STEP)
    assert f"batch {record['batch']}" in out and "is the logged one" in out
    assert "from checkpoint step-0000016" in out
    assert "mined table from mined/table-step-0000020.npy" in out
    assert f"loss on {engine}" in out and "the state was rebuilt exactly" in out
    assert "every backend agrees" in out

    report = replay(run, STEP)
    assert report.digest == record["batch"]
    assert [r.backend for r in report.results] == backends.available()
    own = next(r for r in report.results if r.backend == engine)
    assert np.float32(own.loss) == np.float32(record["loss"])  # same engine, same numbers
    for result in report.results:
        assert result.agrees and {c.name for c in result.comparisons} > {"loss"}


def test_a_pruned_mined_table_is_mined_again(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["numpy"], tmp_path)
    (run / "mined" / "table-step-0000020.npy").unlink()
    report = replay(run, STEP, ["numpy"])
    notes = "\n".join(report.notes)
    assert "mined again with exact, as the run did" in notes
    assert report.digest == logged(run, STEP)["batch"]
    assert "the state was rebuilt exactly" in notes
    assert report.exit_code == 0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point of it
def test_negative_control_blown_up_weights_are_caught(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoint 16's proj.weight times 1e25, its sha256 repaired so it loads: float32 engines
    overflow (|y|^2 > 3.4e38) where the float64 reference does not, a real disagreement."""
    run = copy_run(runs["numpy"], tmp_path)
    ckpt = run / "checkpoints" / "step-0000016"
    weight = np.load(ckpt / "proj.weight.npy")
    np.save(ckpt / "proj.weight.npy", (weight * np.float32(1e25)).astype(np.float32))
    meta = json.loads((ckpt / "meta.json").read_text())
    digest = hashlib.sha256((ckpt / "proj.weight.npy").read_bytes()).hexdigest()
    meta["arrays"]["proj.weight"]["sha256"] = digest
    (ckpt / "meta.json").write_text(json.dumps(meta))
    load_checkpoint(ckpt)  # the corruption passes every checksum

    assert main(["replay", "--run", str(run), "--step", "17"]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES" in out and "the rebuilt state differs" in out
    for engine in backends.available():
        assert f"{engine} vs reference" in out
    everyone = ", ".join(backends.available())
    verb = "disagree" if len(backends.available()) > 1 else "disagrees"
    assert f"{everyone} {verb} with the float64 reference (exit code 1)" in out


def test_a_batch_that_is_not_the_logged_one_is_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(runs["numpy"], tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "seed": 1}))
    assert main(["replay", "--run", str(run), "--step", str(STEP)]) == 2
    captured = capsys.readouterr()
    [line] = captured.err.strip().splitlines()
    assert "is not the logged" in line and "replay refused" in line
    assert captured.out == ""


@pytest.mark.parametrize("step", ["-1", "30"])
def test_a_step_the_run_never_took_is_refused(
    runs: dict[str, Path], step: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "--run", str(runs["numpy"]), "--step", step]) == 2
    assert "holds steps 0..29" in capsys.readouterr().err


@pytest.mark.skipif("torch-cpu" not in backends.available(), reason="rebuilds on torch-cpu")
def test_a_one_percent_engine_bug_is_caught(runs: dict[str, Path], monkeypatch) -> None:
    """An engine whose loss is off by 1% (its scores scaled by 1.01, as a wrong temperature
    would) disagrees at replay's tolerance, while the correct engine agrees."""
    from twotower.backends.numpy_backend import NumpyBackend

    correct = NumpyBackend._infonce
    monkeypatch.setattr(
        NumpyBackend, "_infonce", lambda self, q, batch: correct(self, q * np.float32(1.01), batch)
    )
    report = replay(runs["torch-cpu"], STEP)
    verdicts = {result.backend: result.agrees for result in report.results}
    assert verdicts == {"numpy": False, "torch-cpu": True}
    assert report.exit_code == 1


BANK_RECIPES = {
    "residual-masked": {},
    "sampled-logq": dict(bank_negatives="sampled", sampled_negatives=50, logq=True),
    "full": dict(bank_negatives="full"),
}


@pytest.mark.parametrize("bank", BANK_RECIPES)
def test_a_run_with_the_recipe_options_is_rebuilt_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bank: str
) -> None:
    """Steps 16..21 re-run at their scheduled rates (mid-decay), with the residual tower and
    seen-item masking (and negatives from the bank: sampled rows with logQ, or all of them):
    the rebuilt loss is the logged one, and the engines agree on it."""
    data = synthesize(tmp_path / "data", samples=300, bank=300, dim=16, seq_len=6, seed=1)
    recipe = dict(lr_schedule="cosine", warmup_steps=10, residual="last", exclude_context=True)
    recipe.update(BANK_RECIPES[bank])
    config = TrainConfig(
        data=str(data.path), out=str(tmp_path / "run"), backend="numpy", **SETTINGS, **recipe
    )
    assert train(config).exit_code == 0
    assert main(["replay", "--run", str(tmp_path / "run"), "--step", str(STEP)]) == 0
    out = capsys.readouterr().out
    assert "the state was rebuilt exactly" in out and "every backend agrees" in out


def test_a_mining_in_flight_at_the_checkpoint_is_mined_again_from_its_queries(
    tmp_path: Path,
) -> None:
    """Refreshes taken at 5, 15, 25 and used at 10, 20, 30: the checkpoint at 8 holds the
    queries of the one in flight; with its table gone, replay of step 12 mines them again."""
    data = synthesize(tmp_path / "data", samples=300, bank=300, dim=16, seq_len=6, seed=1)
    run = tmp_path / "run"
    config = TrainConfig(
        data=str(data.path), out=str(run), backend="numpy", mine_lead=5, **SETTINGS
    )
    assert train(config).exit_code == 0
    assert load_checkpoint(run / "checkpoints" / "step-0000008")[0]["mining"]["take"] == 5
    (run / "mined" / "table-step-0000010.npy").unlink()
    report = replay(run, 12, ["numpy"])
    notes = "\n".join(report.notes)
    assert "from checkpoint step-0000008" in notes
    assert "step 10: no table-step-0000010.npy; mined again with exact, as the run did" in notes
    assert report.digest == logged(run, 12)["batch"]
    assert "the state was rebuilt exactly" in notes


def test_the_trainer_and_replay_take_their_steps_through_one_function(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change inside the shared step (`training.step`'s batch assembly doubling every
    context vector) reaches both: the trainer's losses change, and replay of that run rebuilds
    its step exactly. Negative control: without the change, replay of the same run does not."""
    from twotower.training import step as shared

    assemble = shared.assemble_batch

    def doubled(*args, **kwargs):
        batch = assemble(*args, **kwargs)
        batch.contexts = batch.contexts * np.float32(2)
        return batch

    plain = runs["numpy"]
    data = json.loads((plain / "config.json").read_text())["data"]
    changed = tmp_path / "changed"
    monkeypatch.setattr(shared, "assemble_batch", doubled)
    config = TrainConfig(data=data, out=str(changed), backend="numpy", **SETTINGS)
    assert train(config).exit_code == 0
    record = logged(changed, STEP)
    assert record["batch"] == logged(plain, STEP)["batch"]  # the same rows ...
    assert record["loss"] != logged(plain, STEP)["loss"]  # ... and the trainer's numbers changed

    report = replay(changed, STEP, ["numpy"])
    assert "the state was rebuilt exactly" in "\n".join(report.notes)
    assert np.float32(report.results[0].loss) == np.float32(record["loss"])

    monkeypatch.undo()
    unchanged = replay(changed, STEP, ["numpy"])
    assert "the rebuilt state differs" in "\n".join(unchanged.notes)
    assert np.float32(unchanged.results[0].loss) != np.float32(record["loss"])

"""After training: export -> load -> encode agrees with the run's engine and the float64
reference (torch, NumPy and ONNX encoders); `encode` is chunked and never leaves a torn file;
`search` equals a brute-force top k written here, and --exclude-context drops context items."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference
import twotower
from tests.agreement import assert_agrees, assert_differs
from tests.processes import REPO, child_env, run_twotower
from twotower import backends
from twotower.config import TrainConfig
from twotower.data import load_dataset, synthesize
from twotower.errors import UsageError
from twotower.serve.commands import encode_command, search_command
from twotower.serve.encode import encode_to_file, tower_backend
from twotower.serve.export import export_tower
from twotower.serve.search import drop_context, search_to_file
from twotower.serve.tower_dir import read_tower_files
from twotower.training.checkpoint import load_checkpoint
from twotower.training.evaluation.heldout import held_out
from twotower.training.trainer import train

DIM, HIDDEN, T = 16, 12, 6
TOWERS = {
    "gru-1": dict(tower="gru", hidden=HIDDEN, layers=1, residual="none"),
    "gru-2": dict(tower="gru", hidden=HIDDEN, layers=2, residual="none"),
    "gru-residual": dict(tower="gru", hidden=HIDDEN, layers=2, residual="last"),
    "meanpool": dict(tower="meanpool"),
}
HAS_TORCH = "torch-cpu" in backends.available()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=300, bank=120, dim=DIM, seq_len=T, seed=4)
    return path


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short run per tower (8 steps, a checkpoint at 4 and at 8)."""
    root = tmp_path_factory.mktemp("runs")
    for name, tower in TOWERS.items():
        config = TrainConfig(
            data=str(data),
            out=str(root / name),
            backend="numpy",
            steps=8,
            batch_size=16,
            checkpoint_every=4,
            hard_negatives=0,
            queue_size=32,
            max_eval=40,
            lr=1e-2,
            supervise=False,
            **tower,
        )
        assert train(config).exit_code == 0
    return {name: root / name for name in TOWERS}


def variable_batch(seed: int = 1, batch: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """contexts (B, T, D) float32 with NaN past each length (no engine may read it), lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=batch)
    lengths[: min(T, batch)] = np.arange(1, min(T, batch) + 1)
    contexts = rng.standard_normal((batch, T, DIM)).astype(np.float32)
    contexts[np.arange(T)[None, :] >= lengths[:, None]] = np.nan
    return contexts, lengths


def run_engine(run: Path, name: str) -> backends.Backend:
    """The engine the run trained with, holding its newest checkpoint (independent of serve/)."""
    settings = json.loads((run / "config.json").read_text())
    engine = backends.get(
        name,
        tower=settings["tower"],
        dim=DIM,
        hidden=settings["hidden"] if settings["tower"] == "gru" else DIM,
        layers=settings["layers"],
        residual=settings["residual"],
    )
    engine.load_state(load_checkpoint(run)[1])
    return engine


@pytest.mark.parametrize("tower", TOWERS)
def test_an_exported_tower_encodes_like_the_run_and_the_reference(
    runs: dict[str, Path], tower: str, tmp_path: Path
) -> None:
    run = runs[tower]
    formats = ["safetensors"] + (["torch"] if HAS_TORCH else [])
    contexts, lengths = variable_batch()
    _, state = load_checkpoint(run)
    params = {
        name: value.astype(np.float64)
        for name, value in state.items()
        if not name.startswith(("opt.", "queue."))
    }
    kind = TOWERS[tower]["tower"]
    clean = np.where(np.isnan(contexts), 0.0, contexts)
    residual = TOWERS[tower].get("residual", "none")
    expected = reference.encode(kind, params, clean, lengths, residual)
    trained = run_engine(run, "numpy").encode(contexts, lengths)
    for format in formats:
        out = export_tower(run, tmp_path / format, checkpoint="latest", format=format)
        doc = json.loads((out / "tower.json").read_text())
        assert doc["kind"] == kind and doc["dim"] == DIM and doc["residual"] == residual
        assert doc["source"]["step"] == 8
        engines = ["numpy"] + (["torch"] if HAS_TORCH else [])
        for engine in engines:
            q = twotower.load_tower(out, engine=engine).encode(contexts, lengths)
            assert_agrees(q, expected, np.float32, f"{format}/{engine} vs reference")
            assert_agrees(q, trained, np.float32, f"{format}/{engine} vs the run's numpy engine")
    # negative control: the checkpoint of step 4 is another tower
    early = export_tower(run, tmp_path / "early", checkpoint="step-4")
    q = twotower.load_tower(early, engine="numpy").encode(contexts, lengths)
    assert_differs(q, expected, np.float32, "step-4 export vs step-8 reference")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_the_torch_module_is_an_nn_module_in_eval_mode_with_torch_names(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    out = export_tower(runs["gru-2"], tmp_path / "t", checkpoint="latest", format="torch")
    tower = twotower.load_tower(out)
    assert isinstance(tower, torch.nn.Module) and not tower.training
    saved = torch.load(out / "tower.pt")
    assert (
        set(saved)
        == set(tower.state_dict())
        == {
            *(
                f"gru.{w}_l{layer}"
                for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                for layer in (0, 1)
            ),
            "proj.weight",
            "proj.bias",
        }
    )
    contexts, lengths = variable_batch()
    with torch.no_grad():
        q = tower(torch.from_numpy(contexts), torch.from_numpy(lengths)).numpy()
    expected = run_engine(runs["gru-2"], "torch-cpu").encode(contexts, lengths)
    assert_agrees(q, expected, np.float32, "module call vs the run's torch-cpu engine")


@pytest.mark.parametrize("tower", ["gru-2", "gru-residual", "meanpool"])
def test_onnx_agrees_with_the_reference(runs: dict[str, Path], tower: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    if not HAS_TORCH:
        pytest.skip("exporting ONNX needs torch")
    out = export_tower(runs[tower], tmp_path / "onnx", checkpoint="latest", format="onnx")
    _, state = load_checkpoint(runs[tower])
    session = twotower.load_tower(out, engine="onnx")
    kind, residual = TOWERS[tower]["tower"], TOWERS[tower].get("residual", "none")
    for seed, batch in ((1, 9), (2, 3)):  # dynamic batch; lengths up to T
        contexts, lengths = variable_batch(seed, batch)
        clean = np.where(np.isnan(contexts), 0.0, contexts)
        expected = reference.encode(kind, state, clean, lengths, residual)
        assert_agrees(session.encode(contexts, lengths), expected, np.float32, "onnx")
    longer = np.random.default_rng(3).standard_normal((2, 2 * T, DIM)).astype(np.float32)
    longer_lengths = np.array([2 * T, 5])  # dynamic length: longer than any seen in training
    expected = reference.encode(kind, state, longer, longer_lengths, residual)
    assert_agrees(session.encode(longer, longer_lengths), expected, np.float32, "onnx, T=12")


def test_the_numpy_encoder_never_imports_torch(runs: dict[str, Path], tmp_path: Path) -> None:
    out = export_tower(runs["gru-1"], tmp_path / "np")
    script = (
        "import sys, numpy as np, twotower\n"
        f"tower = twotower.load_tower({str(out)!r}, engine='numpy')\n"
        f"q = tower.encode(np.ones((2, 3, {DIM}), np.float32), np.array([3, 1]))\n"
        "assert q.shape == (2, 16), q.shape\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_checkpoint_best_reads_run_best(runs: dict[str, Path], tmp_path: Path) -> None:
    """RUN/best/ (kept by training: the best held-out evaluation's parameters) is exported."""
    run = runs["gru-1"]
    meta, state = load_checkpoint(run, which="best")
    best = read_tower_files(export_tower(run, tmp_path / "best", checkpoint="best"))
    assert best.doc["source"]["step"] == meta["step"]
    assert best.params.keys() <= state.keys()
    for name, value in best.params.items():
        np.testing.assert_array_equal(value, state[name])


def test_export_takes_best_unless_told_and_says_which(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Like HF Trainer's load_best_model_at_end: a run that kept best/ exports it by default,
    named in one line on stderr; this run's best/ is its untrained step 0 (no evaluation beat
    it), so a second line says so and names --checkpoint latest, which exports the newest
    checkpoint instead, without that line."""
    run = runs["gru-1"]
    best_meta, best = load_checkpoint(run, which="best")
    latest_meta, latest = load_checkpoint(run, which="latest")
    assert best_meta["step"] == 0 < latest_meta["step"]  # else the test could not tell them apart
    cases = (([], best_meta, best), (["--checkpoint", "latest"], latest_meta, latest))
    for flags, meta, state in cases:
        out = tmp_path / f"export{len(flags)}"
        result = run_twotower("export", "--run", str(run), "--out", str(out), *flags)
        assert result.returncode == 0, result.stderr
        said = [line for line in result.stderr.splitlines() if "picks another" in line]
        assert len(said) == 1 and f"step {meta['step']}" in said[0], result.stderr
        assert ("best/" in said[0]) == (not flags)
        warned = [line for line in result.stderr.splitlines() if "untrained" in line]
        if flags:
            assert not warned, result.stderr
        else:
            assert len(warned) == 1, result.stderr
            assert f"the latest checkpoint is step {latest_meta['step']}" in warned[0]
            assert "--checkpoint latest" in warned[0]
        exported = read_tower_files(out)
        assert exported.doc["source"]["checkpoint"] == ("latest" if flags else "best")
        for name, value in exported.params.items():
            np.testing.assert_array_equal(value, state[name])


def test_eval_export_and_encode_take_the_same_checkpoint_by_default(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """One default for every command that reads a run: eval scores the step export writes and
    encode encodes with (best/ here, step 0, not the latest at 8), and each says so."""
    run = runs["gru-1"]
    best_step = load_checkpoint(run, which="best")[0]["step"]
    assert best_step != load_checkpoint(run, which="latest")[0]["step"]
    evaluated = run_twotower("eval", "--run", str(run))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"tower: step {best_step}\n" in evaluated.stdout, evaluated.stdout
    exported = run_twotower("export", "--run", str(run), "--out", str(tmp_path / "tower"))
    assert exported.returncode == 0, exported.stderr
    assert read_tower_files(tmp_path / "tower").doc["source"]["step"] == best_step
    encoded = run_twotower("encode", "--run", str(run), "--out", str(tmp_path / "q.npy"))
    assert encoded.returncode == 0, encoded.stderr
    for result in (evaluated, exported, encoded):
        said = [line for line in result.stderr.splitlines() if "picks another" in line]
        assert (
            len(said) == 1 and f"best/ (its best held-out evaluation), step {best_step}" in said[0]
        )
        assert "--checkpoint latest takes it" in result.stderr


def test_a_bad_export_directory_is_one_line(tmp_path: Path, runs: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="no tower.json"):
        twotower.load_tower(tmp_path)
    out = export_tower(runs["gru-1"], tmp_path / "x")
    (out / "tower.safetensors").write_bytes(b"\x01")
    with pytest.raises(UsageError, match="not a safetensors file"):
        twotower.load_tower(out)
    without_best = tmp_path / "run"
    shutil.copytree(runs["gru-1"], without_best)
    shutil.rmtree(without_best / "best")
    with pytest.raises(UsageError, match="best"):
        export_tower(without_best, tmp_path / "y", checkpoint="best")
    result = run_twotower(
        "export",
        "--run",
        str(runs["gru-1"]),
        "--out",
        str(tmp_path / "z"),
        "--checkpoint",
        "step-3",
    )
    assert result.returncode == 2 and "no checkpoint step-0000003" in result.stderr
    assert "Traceback" not in result.stderr


def test_safetensors_files_are_the_standard_format(runs: dict[str, Path], tmp_path: Path) -> None:
    numpy_reader = pytest.importorskip("safetensors.numpy")
    out = export_tower(runs["gru-2"], tmp_path / "st")
    theirs = numpy_reader.load_file(str(out / "tower.safetensors"))
    ours = read_tower_files(out).params
    assert set(theirs) == set(ours)
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name])


# --- encode ---------------------------------------------------------------------------------


def test_chunked_encoding_equals_row_by_row(
    runs: dict[str, Path], data: Path, tmp_path: Path
) -> None:
    dataset = load_dataset(data)
    engine = tower_backend(read_tower_files(export_tower(runs["gru-2"], tmp_path / "m")), "numpy")
    rows = np.arange(dataset.num_samples)[::3]  # 100 rows, chunks of 7: 15 chunks
    out = encode_to_file(engine, dataset, rows, tmp_path / "q.npy", chunk=7)
    encoded = np.load(out, mmap_mode="r")
    by_row = [engine.encode(*dataset.gather(np.array([row]))[:2])[0] for row in rows]
    np.testing.assert_allclose(encoded, np.stack(by_row), rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".q.npy.tmp-*"))


def test_encode_from_the_cli_selects_the_runs_held_out_rows(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Which rows, not only how many: the vectors `--rows held-out` writes are, in order, the
    rows of the `--rows all` output that the trainer held out (its split rebuilt from the run's
    whole config.json, not from the few settings encode reads); the data's first rows are not."""
    run = runs["meanpool"]
    out, every = tmp_path / "heldout.npy", tmp_path / "all.npy"
    flags = "--backend numpy".split()
    result = run_twotower(
        "encode", "--run", str(run), *flags, "--rows", "held-out", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    done = run_twotower("encode", "--run", str(run), *flags, "--rows", "all", "--out", str(every))
    assert done.returncode == 0, done.stderr
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    rows = held_out(config, load_dataset(config.data)).eval_rows
    heldout = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["eval"]
    assert len(rows) == heldout and not np.array_equal(rows, np.arange(heldout))
    np.testing.assert_array_equal(np.load(out), np.load(every)[rows])
    assert f"twotower: encode: {heldout:,} rows with numpy\n" in result.stderr  # at the start
    assert f"twotower: encode: {heldout:,} rows in " in result.stderr  # at the end, with its rate
    assert f"twotower: wrote {out} ({heldout:,} x {DIM} float32)" in result.stderr


@pytest.mark.parametrize("old", [True, False], ids=["old-file", "no-file"])
def test_a_sigkill_mid_write_leaves_the_old_file_or_none(
    runs: dict[str, Path], data: Path, tmp_path: Path, old: bool
) -> None:
    """A real SIGKILL after two chunks are written (the fault switch at the encode point)."""
    model = export_tower(runs["gru-1"], tmp_path / "m")
    out = tmp_path / "q.npy"
    before = np.arange(6, dtype=np.float32).reshape(2, 3)
    if old:
        np.save(out, before)
    code = (
        "import sys; from twotower.serve import encode, commands\n"
        "encode.chunk_rows = lambda dataset: 40\n"
        f"commands.encode_command({str(out)!r}, {str(data)!r}, model={str(model)!r}, "
        "backend='numpy')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(TWOTOWER_INJECT_FAULT="kill@encode:2"),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert list(tmp_path.glob(".q.npy.tmp-*")), "the child died mid-write, leaving its temp file"
    if old:
        np.testing.assert_array_equal(np.load(out), before)
    else:
        assert not out.exists()
    # the next run replaces it whole
    encode_command(str(out), str(data), model=str(model), backend="numpy")
    assert np.load(out).shape == (300, DIM)


# --- search ---------------------------------------------------------------------------------


def brute_force(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ bank.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_exact_search_equals_brute_force(runs: dict[str, Path], data: Path, tmp_path: Path) -> None:
    dataset = load_dataset(data)
    model = export_tower(runs["gru-2"], tmp_path / "m")
    out = search_command(
        str(tmp_path / "r.npz"), k=10, data=str(data), model=str(model), backend="numpy"
    )
    results = np.load(out)
    assert list(results["rows"]) == list(range(dataset.num_samples))
    queries = twotower.load_tower(model, engine="numpy").encode(
        *dataset.gather(results["rows"])[:2]
    )
    scores, ids = brute_force(queries, np.asarray(dataset.bank), 10)
    np.testing.assert_array_equal(results["ids"], ids)
    np.testing.assert_allclose(results["scores"], scores, rtol=0, atol=1e-5)
    assert results["ids"].dtype == np.int64 and results["scores"].dtype == np.float32


def test_exclude_context_never_returns_a_context_item_but_the_positive(
    runs: dict[str, Path], data: Path, tmp_path: Path
) -> None:
    dataset = load_dataset(data)
    model = export_tower(runs["gru-1"], tmp_path / "m", checkpoint="latest")
    k = 20
    out = search_to_file(
        tower_backend(read_tower_files(model), "numpy"),
        _exact(dataset),
        dataset,
        np.arange(dataset.num_samples),
        k,
        tmp_path / "r.npz",
        exclude_context=True,
        chunk=64,
    )
    results = np.load(out)
    context = np.asarray(dataset.context_ids)
    positives = np.asarray(dataset.positives)
    returned_context = 0
    for row, ids in enumerate(results["ids"]):
        own = set(context[row][context[row] >= 0].tolist()) - {int(positives[row])}
        assert not own & set(ids.tolist()), f"row {row} returned a context item"
        returned_context += int(positives[row] in ids and positives[row] in context[row])
    assert returned_context > 0, "a positive that is also a context item must stay"
    # independently: brute force over the whole bank, filtered here, first k kept
    queries = twotower.load_tower(model, engine="numpy").encode(
        *dataset.gather(results["rows"])[:2]
    )
    _, ranked = brute_force(queries, np.asarray(dataset.bank), dataset.bank_size)
    for row in range(0, dataset.num_samples, 7):
        own = set(context[row][context[row] >= 0].tolist()) - {int(positives[row])}
        expected = [i for i in ranked[row].tolist() if i not in own][:k]
        assert results["ids"][row].tolist() == expected


def _exact(dataset):  # noqa: ANN001, ANN202 - a built exact miner
    from twotower import miners

    miner = miners.get("exact", fault_phase=None)
    miner.build(dataset.bank)
    return miner


def test_drop_context_pads_when_too_many_are_dropped() -> None:
    ids = np.array([[5, 6, 7]])
    scores = np.array([[3.0, 2.0, 1.0]], np.float32)
    kept_scores, kept_ids = drop_context(scores, ids, np.array([[5, 7, -1]]), np.array([9]), 3)
    assert kept_ids.tolist() == [[6, -1, -1]] and kept_scores[0, 0] == 2.0
    assert np.isneginf(kept_scores[0, 1:]).all()
    # the positive stays even when it is a context item
    _, kept_ids = drop_context(scores, ids, np.array([[5, 7, -1]]), np.array([7]), 2)
    assert kept_ids.tolist() == [[6, 7]]


def test_search_from_the_cli_with_an_isolated_miner(
    runs: dict[str, Path], data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("faiss")
    out = tmp_path / "r.npz"
    flags = "--k 5 --miner faiss --rows held-out --backend numpy".split()
    result = run_twotower("search", "--run", str(runs["gru-1"]), *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    exact = search_command(
        str(tmp_path / "e.npz"), k=5, run=str(runs["gru-1"]), rows="held-out", backend="numpy"
    )
    np.testing.assert_array_equal(np.load(out)["ids"], np.load(exact)["ids"])


def test_a_search_whose_worker_segfaults_is_one_line_not_a_traceback(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """`twotower search` has no fallback chain: a worker killed by a real SIGSEGV ends it with
    one line naming the signal and what to try, exit 3, and no partial output file."""
    pytest.importorskip("faiss")
    out = tmp_path / "r.npz"
    flags = "--k 5 --miner faiss --rows held-out --backend numpy".split()
    result = run_twotower(
        "search",
        "--run",
        str(runs["gru-1"]),
        *flags,
        "--out",
        str(out),
        TWOTOWER_INJECT_FAULT="segv@mine:0:faiss",
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("twotower: error:")]
    assert len(errors) == 1 and "SIGSEGV" in errors[0] and "--miner exact" in errors[0]
    assert not out.exists()

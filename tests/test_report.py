"""`twotower report` and `--tensorboard`: the series and markers behind the picture come from the
run's own files (a real supervised run with a trainer crash, a restart, a backend switch and a
miner worker crash), and the picture is written; TensorBoard gets the same scalars."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO, child_env, run_twotower, train_in_child
from twotower import backends, miners
from twotower.data import synthesize
from twotower.diagnose import report
from twotower.diagnose.run_picture import Marker, run_picture, smooth
from twotower.run.rundir import read_metrics

SMALL = (
    "--batch-size 16 --hidden 16 --hard-negatives 4 --mine-every 5 --mine-lead 0 --mine-pool 8 "
    "--queue-size 32 --max-eval 40 --checkpoint-every 4 --steps 12 --eval-every 6"
).split()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, samples=400, bank=200, dim=16, seq_len=6, seed=5)
    return path


def write_metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_replayed_step_keeps_its_last_record_and_smoothing_is_an_ema(tmp_path: Path) -> None:
    records = [{"event": "start", "step": 0}]
    records += [{"event": "step", "step": s, "loss": 10.0 - s, "grad_norm": 1.0} for s in (1, 2, 3)]
    records += [{"event": "crash", "step": 3, "signal": "SIGKILL", "attempt": 1}]
    records += [
        {"event": "restart", "from_step": 2, "attempt": 2, "backend": "numpy", "miner": "exact"},
        {"event": "start", "step": 2, "backend": "numpy"},
    ]
    records += [{"event": "step", "step": 3, "loss": 99.0, "grad_norm": 2.0}]
    records += [{"event": "nonfinite", "step": 4, "loss": float("nan"), "grad_norm": 3.0}]
    write_metrics(tmp_path, records)
    picture = run_picture(tmp_path)
    assert picture.series["loss"].steps == [1, 2, 3]
    assert picture.series["loss"].values == [9.0, 8.0, 99.0]  # the replayed step 3 wins
    assert picture.series["grad_norm"].values == [1.0, 1.0, 2.0, 3.0]
    expected, average = [], 0.0
    for i, value in enumerate([9.0, 8.0, 99.0]):
        average = 0.9 * average + 0.1 * value
        expected.append(average / (1 - 0.9 ** (i + 1)))
    assert picture.series["loss_smooth"].values == pytest.approx(expected)
    assert smooth([5.0, 5.0]) == pytest.approx([5.0, 5.0])
    assert picture.markers == [
        Marker("restart", 2, "attempt 2: numpy/exact"),
        Marker("resume", 2, "resumed at step 2 on numpy"),
        Marker("crash", 3, "SIGKILL"),
    ]


@pytest.mark.slow
@pytest.mark.skipif(
    not {"torch-cpu"} <= set(backends.available()) or "faiss" not in miners.available(),
    reason="needs torch and faiss",
)
def test_a_run_with_crashes_restarts_and_switches_is_drawn(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    faults = "segv@step:6:torch-cpu,segv@mine:5:faiss"
    result = train_in_child(
        data,
        run,
        *SMALL,
        "--backend",
        "torch-cpu",
        "--fallback",
        "numpy",
        "--miner",
        "faiss",
        "--miner-fallback",
        "exact",
        "--tensorboard",
        str(tmp_path / "tb"),
        TWOTOWER_INJECT_FAULT=faults,
    )
    assert result.returncode == 0, result.stderr
    picture = run_picture(run)
    # the series: every step once, with its loss, gradient norm, time and memory
    for name in ("loss", "loss_smooth", "grad_norm", "grad_norm_smooth", "ms", "rss_kb"):
        assert picture.series[name].steps == list(range(1, 13)), name
    assert all(kb > 10_000 for kb in picture.series["rss_kb"].values)
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "step"]
    last_loss = {r["step"]: r["loss"] for r in steps}
    assert picture.series["loss"].values == [last_loss[s] for s in range(1, 13)]
    assert picture.series["eval:recall@10"].steps == [0, 6, 12]
    assert picture.series["mining:seconds"].steps == [5, 10]
    # the markers: the trainer crashed twice at step 6 (SIGSEGV), restarted from step 4, and
    # switched backend; the faiss worker crashed twice at step 5, then the miner switched
    kinds = [(m.kind, m.step) for m in picture.markers]
    assert kinds.count(("crash", 6)) == 2
    assert all("SIGSEGV" in m.label for m in picture.markers if "crash" in m.kind)
    assert ("restart", 4) in kinds and ("resume", 4) in kinds
    assert Marker("switch", 6, "backend torch-cpu -> numpy") in picture.markers
    assert kinds.count(("miner-crash", 5)) >= 2
    assert any(m.kind == "miner-switch" and "faiss -> exact" in m.label for m in picture.markers)
    # the picture, in both formats
    for name in ("report.png", "report.html"):
        drawn = run_twotower("report", "--run", str(run), "--out", str(tmp_path / name))
        assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "backend torch-cpu -&gt; numpy" in page
    # TensorBoard got the same scalars
    if (tmp_path / "tb").exists():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = [
            EventAccumulator(str(d)).Reload()
            for d in {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
        ]
        losses = {e.step: e.value for acc in events for e in acc.Scalars("train/loss")}
        assert losses[12] == pytest.approx(picture.series["loss"].values[-1], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(data: Path, tmp_path: Path) -> None:
    """tensorboard hidden from the child (a None entry in sys.modules fails its import)."""
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from twotower.cli import main\n"
        f"sys.exit(main(['train', '--data', {str(data)!r}, '--out', {str(tmp_path / 'r')!r}, "
        f"'--no-supervise', '--backend', 'numpy', '--tensorboard', {str(tmp_path / 'tb')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "--tensorboard needs the" in result.stderr
    assert not (tmp_path / "r").exists()


def test_report_without_matplotlib_is_one_line(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", [{"event": "step", "step": 1, "loss": 1.0}])
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from twotower.cli import main\n"
        f"sys.exit(main(['report', '--run', {str(tmp_path / 'run')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and "pip install 'twotower[report]'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_report_draws_a_small_run_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        {"event": "step", "step": s, "loss": 1.0 / s, "grad_norm": 0.5, "ms": 3.0, "rss_kb": 90_000}
        for s in range(1, 30)
    ]
    records += [
        {"event": "eval", "step": 29, "recall@10": 0.5},
        {"event": "mined", "step": 10, "seconds": 0.2},
    ]
    write_metrics(tmp_path / "run", records)
    result = run_twotower("report", "--run", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "report.png").stat().st_size > 10_000


def test_the_baselines_a_run_logged_are_drawn_and_empty_panels_take_no_room(
    data: Path, tmp_path: Path
) -> None:
    """A real run (no crash, no mining): every metric of both baselines, found in metrics.jsonl
    by its content (the record holding 'last item'), is a flat dashed or dotted line over the
    run in the held-out panel; there is no events panel and no mining panel."""
    plt = pytest.importorskip("matplotlib.pyplot")
    run = tmp_path / "run"
    args = "--no-supervise --backend numpy --hard-negatives 0 --steps 12 --eval-every 6"
    result = train_in_child(data, run, *args.split(), "--max-eval", "40")
    assert result.returncode == 0, result.stderr
    logged = next(r for r in read_metrics(run / "metrics.jsonl") if "last item" in r)
    figure, events, axes = report._panels(plt, run_picture(run))
    assert events is None
    labels = [axis.get_ylabel() for axis in axes]
    assert labels == ["InfoNCE loss", "gradient norm", "held-out", "step time (ms)"]
    flat = {
        (line.get_linestyle(), line.get_color(), float(line.get_ydata()[0]))
        for line in axes[2].get_lines()
        if line.get_linestyle() in ("--", ":")
    }
    expected = {
        (style, f"C{i}", float(logged[name][metric]))
        for name, style in (("context mean", "--"), ("last item", ":"))
        for i, metric in enumerate(("recall@1", "recall@10", "recall@100", "mrr@100"))
    }
    assert flat == expected
    plt.close(figure)

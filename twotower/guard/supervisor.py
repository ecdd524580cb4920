"""`supervise(config)`: train in child processes that may crash; report, restart, switch engines.

Each attempt runs `python -m twotower train --config RUN/supervisor/attempt-N.json
--no-supervise` (no shell) under `monitor.WatchedChild`: unbuffered, with
faulthandler writing to `crashes/attempt-N.stacks.txt`, its heartbeat followed
(and, with --hang-timeout, watched). How the child ends decides what happens:

    0          done
    2          bad input: final, passed through at once (a run directory this session
               made, refused before the trainer wrote to it, is removed again)
    4          a full disk (`run.disk`): final, passed through at once; so is a crash whose
               last words are ENOSPC or EDQUOT (no restart or engine switch frees a disk)
    130        interrupted (SIGINT/SIGTERM here are forwarded; the child checkpoints)
    otherwise  a crash: `crashes/attempt-N.json` and a summary on stderr
               (`forensics.examine`), then a restart from the newest checkpoint

If the same engine crashes twice at the same phase and step, the next attempt
moves down --fallback (the backend: every phase but the miner's) or
--miner-fallback (the miner's phases, `MINER_PHASES`: its build, its index
load, its search, where it runs in-process; an isolated miner's crash never
ends the trainer, its chain restarts or replaces it). After --max-restarts
restarts it gives up with exit code 3 and a summary of every attempt. Restarts,
switches and crashes are appended to metrics.jsonl (while no child runs) and
log.txt. Attempt numbers continue across supervised sessions of one run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twotower import backends, miners
from twotower.atomic import replace_file
from twotower.config import METRICS, TrainConfig
from twotower.errors import (
    EXIT_DISK_FULL,
    EXIT_GAVE_UP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from twotower.guard import evidence, forensics
from twotower.guard.monitor import SignalForwarder, WatchedChild, child_env, say
from twotower.process import faults, wait_policy
from twotower.process.crash_dump import CRASH_FILE_ENV, SUPERVISOR_PID_ENV
from twotower.process.phase import MINER_PHASES
from twotower.run.disk import DISK_FULL_ERRNOS, disk_full_line, stops_on_full_disk
from twotower.run.lock import RunLock
from twotower.run.records import Beat
from twotower.run.rundir import MetricsLog, RunDir, read_metrics
from twotower.training.checkpoint import list_checkpoints
from twotower.training.trainer import PROGRESS_ENV, RunResult

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
ATTEMPT_FILE = re.compile(r"^(?:attempt|run)-(\d+)\.")


def trainer_env(stack_file: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a twotower child: `monitor.child_env` with twotower importable and
    twotower's OpenMP wait policy (`process.wait_policy`) unless the user chose one.

    stack_file: where a trainer's faulthandler writes; with it goes this
    process's pid (if the supervisor dies, the trainer checkpoints and stops).
    """
    env = wait_policy.child_env(child_env(**extra))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    if stack_file is not None:
        env[CRASH_FILE_ENV] = str(stack_file)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


FINAL = (EXIT_OK, EXIT_USAGE, EXIT_DISK_FULL)  # no restart: done, bad input, a full disk


def disk_full(outcome: forensics.ChildOutcome) -> bool:
    """Whether a child's last words are an OSError of a full disk (ENOSPC, EDQUOT)."""
    return any(f"[Errno {number}]" in outcome.stderr_tail for number in DISK_FULL_ERRNOS)


def last_beat(outcome: forensics.ChildOutcome, config: TrainConfig) -> Beat:
    """The child's last heartbeat as a record, its engines filled in from `config` where it
    named none; before its first beat (or for an unreadable one) phase 'start-up', no step."""
    beat = outcome.heartbeat
    if beat is None:
        return Beat(outcome.pid, None, "start-up", config.backend, config.miner)
    return dataclasses.replace(
        beat, backend=beat.backend or config.backend, miner=beat.miner or config.miner
    )


def next_number(*folders: Path) -> int:
    """1 + the highest N of the files named `attempt-N.*` (or `run-N.*`) in `folders`."""
    numbers = [
        int(match.group(1))
        for folder in folders
        if folder.is_dir()
        for path in folder.iterdir()
        if (match := ATTEMPT_FILE.search(path.name))
    ]
    return max(numbers, default=0) + 1


class Supervisor:
    """One supervised session of a run (see the module docstring); `run()` returns its result."""

    def __init__(self, config: TrainConfig):
        assert config.out is not None  # TrainConfig resolves it
        self.config = config
        self.run_dir = RunDir(config.out)
        self.folder = self.run_dir.root / "supervisor"
        self.armed = faults.parse_faults(os.environ.get(faults.ENV_VAR))
        self.attempts: list[dict[str, Any]] = []
        self.crash_points: list[tuple[str, str, str, int | None]] = []
        self._unavailable: dict[str, str | None] = {}

    def run(self) -> RunResult:
        """Run attempts until one finishes, input is refused, a stop is asked for, or the
        restarts are used up."""
        self._check_engine_names()
        fresh = not self.run_dir.root.exists()
        lock = RunLock(self.run_dir.root)
        with stops_on_full_disk(self.run_dir.root):  # the supervisor's own writes
            took_over = lock.acquire()  # for this session and its children; RunInUse: exit 2
            if took_over:
                say(took_over)
            try:
                return self._attempts(fresh)
            finally:
                lock.release()

    def _attempts(self, fresh: bool) -> RunResult:
        """`run`'s loop, the lock held; fresh: the run directory did not exist before."""
        metrics_before = self._metrics_count()
        number = next_number(self.folder, self.run_dir.crashes)
        attempt = dataclasses.replace(self.config, supervise=False)
        with SignalForwarder() as signals:
            while True:
                if signals.received is not None:
                    return self._result(EXIT_INTERRUPTED, metrics_before, attempt)
                outcome = self._attempt(number, attempt, signals)
                code = outcome.exit.returncode
                if code not in FINAL and disk_full(outcome):  # not caught by the trainer
                    say(disk_full_line(self.run_dir.root))
                    code = EXIT_DISK_FULL
                if code in FINAL and outcome.interrupted is None:
                    if code == EXIT_USAGE and fresh and not self.run_dir.metrics.exists():
                        shutil.rmtree(self.run_dir.root)  # refused up front: leave nothing
                    self.attempts.append(self._summary(number, attempt, outcome, None, None))
                    return self._result(code, metrics_before, attempt)
                if outcome.interrupted is not None or code == EXIT_INTERRUPTED:
                    self.attempts.append(self._summary(number, attempt, outcome, None, None))
                    return self._result(EXIT_INTERRUPTED, metrics_before, attempt)
                restarts = len(self.attempts)
                if restarts >= self.config.max_restarts:
                    self._crashed(number, attempt, outcome, "give up")
                    return self._give_up(metrics_before, attempt)
                attempt = self._crashed(number, attempt, outcome, "restart")
                number += 1

    # --- one attempt ------------------------------------------------------------------------

    def _attempt(
        self, number: int, config: TrainConfig, signals: SignalForwarder
    ) -> forensics.ChildOutcome:
        """Run attempt `number` with `config` in a watched child; how it ended."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run_dir.crashes.mkdir(parents=True, exist_ok=True)
        config_file = self.folder / f"attempt-{number}.json"
        replace_file(config_file, config.to_json())
        stack_file = self.run_dir.crashes / f"attempt-{number}.stacks.txt"
        extra = {PROGRESS_ENV: "1"} if sys.stderr.isatty() else {}
        command = [sys.executable, "-m", "twotower", "train", "--config", str(config_file)]
        child = WatchedChild(
            [*command, "--no-supervise"],
            trainer_env(stack_file, **extra),
            signals,
            heartbeat=self.run_dir.heartbeat,
            hang_timeout=config.hang_timeout,
            stack_file=stack_file,
            note=self._log,
            keep_core=config.keep_core or None,
        )
        return child.run()

    def _crashed(
        self, number: int, config: TrainConfig, outcome: forensics.ChildOutcome, then: str
    ) -> TrainConfig:
        """Report the crash and what comes next ("restart" or "give up"); log each event.

        Returns the next attempt's config: resumed, perhaps on another engine.
        """
        beat = last_beat(outcome, config)
        following, switch = (
            self._next_config(config, outcome) if then == "restart" else (config, None)
        )
        from_step = self._newest_step()
        if then == "give up":
            plan = f"give up: {self.config.max_restarts} restarts used (--max-restarts)"
        else:
            plan = f"restart from step {from_step} on backend {following.backend}, "
            plan += f"miner {following.miner}"
        report = forensics.examine(outcome, f"attempt {number}", self.armed, next=plan)
        report_path = forensics.write_report(
            self.run_dir.crashes / f"attempt-{number}.json", report
        )
        cause = report["causes"][0]
        self.attempts.append(self._summary(number, config, outcome, report_path, cause))
        summary = [*forensics.summary_lines(report), f"  report: {report_path}", f"  next: {plan}"]
        print("twotower: " + "\n".join(summary), file=sys.stderr, flush=True)
        self._record(
            "crash",
            "\n".join(summary),
            echo=False,
            attempt=number,
            pid=outcome.pid,
            returncode=outcome.exit.returncode,
            signal=outcome.exit.signal,
            phase=beat.phase,
            step=beat.step,
            backend=beat.backend,
            miner=beat.miner,
            cause=cause["cause"],
            report=str(report_path.relative_to(self.run_dir.root)),
        )
        if then != "restart":
            return following
        if switch is not None:
            self._record(
                "switch",
                f"switching {switch['role']} {switch['previous']} -> {switch['to']}: "
                f"{switch['reason']}",
                attempt=number + 1,
                **switch,
            )
        self._record(
            "restart",
            f"attempt {number + 1}: {plan}",
            attempt=number + 1,
            from_step=from_step,
            backend=following.backend,
            miner=following.miner,
        )
        return following

    def _next_config(
        self, config: TrainConfig, outcome: forensics.ChildOutcome
    ) -> tuple[TrainConfig, dict[str, Any] | None]:
        """The config after this crash, and the engine switch it makes (None: no switch).

        The crash point is (role, engine, phase, step), the role being the miner's
        for the mine phase and the backend's for every other one (and for a crash
        before the first heartbeat). At its second occurrence the role's engine moves
        down its fallback chain.
        """
        beat = last_beat(outcome, config)
        phase = beat.phase
        role = "miner" if phase in MINER_PHASES else "backend"
        engine = getattr(beat, role)
        point = (role, engine, phase, beat.step)
        repeated = point in self.crash_points
        self.crash_points.append(point)
        # restarts keep the engines the child resolved ("auto" -> torch-cpu), except a miner
        # "auto" chose: its settings (the index) are the child's, which chooses again the same
        backend = beat.backend or config.backend
        miner = config.miner if config.miner == "auto" else beat.miner or config.miner
        following = dataclasses.replace(config, resume=True, backend=backend, miner=miner)
        if not repeated:
            return following, None
        to = self._next_engine(role, engine)
        if to is None:
            self._log(f"no {role} after {engine} in the fallback chain: retrying it")
            return following, None
        how = outcome.exit.signal or f"exit code {outcome.exit.code}"
        switch = {
            "role": role,
            "previous": engine,
            "to": to,
            "reason": f"{role} {engine} crashed twice in phase {phase} at step {beat.step} ({how})",
        }
        if role == "backend":
            return dataclasses.replace(following, backend=to), switch
        return dataclasses.replace(following, miner=to), switch

    def _summary(
        self,
        number: int,
        config: TrainConfig,
        outcome: forensics.ChildOutcome,
        report: Path | None,
        cause: dict[str, Any] | None,
    ) -> dict[str, Any]:
        beat = last_beat(outcome, config)
        return {
            "attempt": number,
            "pid": outcome.pid,
            "backend": beat.backend,
            "miner": beat.miner,
            "returncode": outcome.exit.returncode,
            "exit": outcome.exit.describe(),
            "signal": outcome.exit.signal,
            "phase": beat.phase,
            "step": beat.step,
            "seconds": round(outcome.seconds, 2),
            "peak_rss_kb": outcome.peak_rss_kb,
            "report": str(report) if report else None,
            "cause": f"{cause['confidence']}: {cause['cause']}" if cause else None,
        }

    # --- engines ----------------------------------------------------------------------------

    def _check_engine_names(self) -> None:
        """Refuse unknown names in --fallback / --miner-fallback before anything runs."""
        for role, registry, names in (
            ("backend", backends.REGISTRY, self.config.fallback),
            ("miner", miners.REGISTRY, self.config.miner_fallback),
        ):
            unknown = [name for name in names if name not in registry.names]
            if unknown:
                raise UsageError(
                    f"--{'fallback' if role == 'backend' else 'miner-fallback'}: unknown {role} "
                    f"{', '.join(unknown)}; known: {', '.join(registry.names)}"
                )

    def _next_engine(self, role: str, current: str) -> str | None:
        """The next available engine after `current` in [the user's choice] + its fallbacks."""
        first = getattr(self.config, role)
        chain = self.config.fallback if role == "backend" else self.config.miner_fallback
        order = [first] + [name for name in chain if name != first]
        position = order.index(current) if current in order else 0
        for name in order[position + 1 :]:
            reason = self._why_unavailable(role, name)
            if reason is None:
                return name
            self._log(f"skipping {role} {name} in the fallback chain: {reason}")
        return None

    def _why_unavailable(self, role: str, name: str) -> str | None:
        """None if engine `name` runs here. torch backends are probed in a child, so the
        supervisor never loads torch itself."""
        if role == "miner":
            return miners.REGISTRY.unavailable_reason[name]()
        if not name.startswith("torch-"):
            return backends.REGISTRY.unavailable_reason[name]()
        if name not in self._unavailable:
            probe = (
                "import sys; from twotower import backends; "
                "print(backends.REGISTRY.unavailable_reason[sys.argv[1]]() or '')"
            )
            try:
                out = subprocess.run(
                    [sys.executable, "-c", probe, name],
                    env=trainer_env(),
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                ok = out.returncode == 0
                reason = out.stdout.strip() if ok else evidence.tail(out.stderr, 1)
            except (OSError, subprocess.SubprocessError) as error:
                reason = f"could not check: {error}"
            self._unavailable[name] = reason or None
        return self._unavailable[name]

    # --- bookkeeping ------------------------------------------------------------------------

    def _log(self, message: str, echo: bool = True) -> None:
        """Append `message` to log.txt, as the trainer's log lines look; if echo, to stderr."""
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{now % 1 * 1e3:03.0f}"
        with self.run_dir.log.open("a", encoding="utf-8") as log_file:
            log_file.write(f"{stamp} WARNING supervisor: {message}\n")
        if echo:
            say(f"supervisor: {message}")

    def _record(self, event: str, message: str, echo: bool = True, **fields: Any) -> None:
        """metrics.jsonl gets {event, **fields} (no child runs now); log.txt (and stderr,
        if echo) gets `message`."""
        metrics = MetricsLog(self.run_dir.metrics)
        metrics.write(event, **fields)
        metrics.close()
        self._log(message, echo)

    def _newest_step(self) -> int:
        """The step of the newest committed checkpoint (the restarted child verifies it)."""
        newest = list_checkpoints(self.run_dir.root)
        return int(newest[-1].name.split("-")[1]) if newest else 0

    def _metrics_count(self) -> int:
        path = self.run_dir.metrics
        return len(read_metrics(path)) if path.exists() else 0

    def _give_up(self, metrics_before: int, config: TrainConfig) -> RunResult:
        lines = [f"gave up after {len(self.attempts) - 1} restarts; every attempt:"]
        for a in self.attempts:
            lines.append(
                f"  attempt {a['attempt']} (pid {a['pid']}, {a['backend']}/{a['miner']}): "
                f"{a['exit']} in phase {a['phase']} at step {a['step']}; {a['cause']}"
            )
        print("twotower: " + "\n".join(lines), file=sys.stderr, flush=True)
        self._record(
            "gave-up",
            f"gave up after {len(self.attempts) - 1} restarts (exit code {EXIT_GAVE_UP})",
            attempts=len(self.attempts),
            restarts=len(self.attempts) - 1,
        )
        return self._result(EXIT_GAVE_UP, metrics_before, config)

    def _result(self, code: int, metrics_before: int, config: TrainConfig) -> RunResult:
        """The session's RunResult, read from the metrics its children logged."""
        records = read_metrics(self.run_dir.metrics)[metrics_before:] if code != EXIT_USAGE else []
        starts = [r for r in records if r["event"] == "start"]
        ends = [r for r in records if r["event"] in ("done", "interrupted")]
        evals_at_0 = [r for r in records if r["event"] == "eval" and r["step"] == 0]
        steps = ends[-1]["step"] if ends else self._newest_step() if code != EXIT_USAGE else 0
        done = [r for r in ends if r["event"] == "done"]
        bests = [r for r in records if r["event"] == "best"]
        return RunResult(
            run_dir=self.run_dir.root,
            exit_code=code,
            steps=steps,
            backend=starts[-1]["backend"] if starts else config.backend,
            miner=starts[-1]["miner"] if starts else config.miner,
            metrics=_metric_values(done[-1]) if done else {},
            metrics_before=_metric_values(evals_at_0[0]) if evals_at_0 else {},
            best_step=bests[-1]["step"] if bests else None,
            best_metrics=_metric_values(bests[-1]) if bests else {},
            stopped_early=any(r["event"] == "early-stop" for r in records),
            attempts=self.attempts,
        )


def _metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The retrieval metrics (recall@c, mrr@100) of an eval, best or done record."""
    return {name: record[name] for name in METRICS if name in record}


def supervise(config: TrainConfig) -> RunResult:
    """Train `config` in supervised child processes (see the module docstring).

    Returns the RunResult of the session: exit_code 0 (done), 2 (refused input),
    3 (gave up after --max-restarts restarts) or 130 (interrupted, checkpoint
    written); `attempts` holds one summary dict per child. Raises UsageError
    for an unknown name in --fallback or --miner-fallback.
    """
    return Supervisor(config).run()

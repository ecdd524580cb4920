"""`twotower ...` sub-commands: argument parsing only; the work lives in the modules.

Bad input is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from twotower.data.synth import DEMO_SIZES
from twotower.errors import EXIT_GAVE_UP, EXIT_OK, UsageError
from twotower.miners.base import MinerCrashed
from twotower.process import wait_policy
from twotower.train_flags import (
    TRAIN_EXAMPLES,
    TRAIN_USAGE,
    add_config_flags,
    add_field_flags,
    config_from_args,
    field_default,
    parse_list,
)
from twotower.training.checkpoint import CHOICES

CHECKPOINT_HELP = f"{CHOICES} (default: best/ where the run kept one, else latest)"


SYNTH_SIZES = {  # `twotower synth`'s flags: what each is, and synthesize's default
    "samples": ("training samples N", DEMO_SIZES["samples"]),
    "bank": ("bank rows M", DEMO_SIZES["bank"]),
    "dim": ("vector size D", DEMO_SIZES["dim"]),
    "seq-len": ("max sequence length T", DEMO_SIZES["seq_len"]),
    "seed": ("seed", 0),
}


class DefaultsShown(argparse.HelpFormatter):
    """Every sub-command's --help ends a flag's help with its default, unless the help already
    says what the default is (a default of None or off means 'not given')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default in (None, False, argparse.SUPPRESS)
        if unset or not action.option_strings or "default" in text.lower():
            return text
        return f"{text} (default: {action.default})"


# --- sub-commands -------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from twotower.training.ranks.distributed import launched_world

    config = config_from_args(args)
    world = launched_world()  # started by torchrun: each rank guards its own trainer
    if config.supervise and world is not None:
        from twotower.guard.rank import guard_rank

        return guard_rank(config, world)
    if config.supervise:
        from twotower.guard.supervisor import supervise

        return supervise(config).exit_code
    from twotower.guard.worker_reports import train

    return train(config).exit_code


def cmd_synth(args: argparse.Namespace) -> int:
    from twotower.data import synthesize

    sizes = {
        k: getattr(args, k)
        for k in ("samples", "bank", "dim", "seq_len", "seed")
        if getattr(args, k) is not None
    }
    dataset = synthesize(args.out, layout=args.layout, overwrite=args.overwrite, **sizes)
    print(f"{dataset.path} holds a synthetic dataset: {dataset.describe()}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from twotower.data import convert, parse_key_map

    dataset = convert(args.npz, args.out, parse_key_map(args.key) if args.key else None)
    print(f"{dataset.path} holds {args.npz} converted: {dataset.describe()}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from twotower import progress
    from twotower.training.evaluation.command import evaluate_run, log_to_stderr

    log_to_stderr()
    with progress.lines_on_stderr():
        report = evaluate_run(
            run=args.run_dir,
            data=args.data,
            tower=args.tower,
            proj=not args.no_proj,
            backend=args.backend,
            miner=args.miner,
            seed=args.seed,
            max_eval=args.max_eval,
            exclude_context=args.exclude_context,
            checkpoint=args.checkpoint,
            rows=args.rows,
        )
    print("\n".join(report.lines()))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Run the command after -- watched; its exit code is passed through."""
    from twotower.guard.watch import watch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return watch(command, args.out, keep_core=args.keep_core)


def cmd_explain(args: argparse.Namespace) -> int:
    """Explain a crash report the user already has (.ips, twotower report, run directory)."""
    from twotower.diagnose.explain import explain

    print(explain(args.path, latest=args.latest, executable=args.exe))
    return EXIT_OK


def cmd_backends(args: argparse.Namespace) -> int:
    from twotower import backends, miners

    print(f"{'engine':12s} {'role':8s} {'available':10s} note")
    for role, registry in (("backend", backends), ("miner", miners)):
        for info in registry.describe():
            print(
                f"{info.name:12s} {role:8s} {'yes' if info.available else 'no':10s} {info.reason}"
            )
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Environment and data checks; exit code 1 when one fails."""
    from twotower.diagnose.doctor import diagnose, exit_code, to_json, to_text

    findings = diagnose(args.data)
    print(to_json(findings) if args.json else to_text(findings))
    return exit_code(findings)


def cmd_replay(args: argparse.Namespace) -> int:
    """Rebuild one step and compare backends; exit code 1 when one disagrees."""
    from twotower.diagnose.replay import replay

    report = replay(args.run_dir, args.step, args.backends, args.data)
    print(report.to_text())
    return report.exit_code


def cmd_export(args: argparse.Namespace) -> int:
    from twotower.serve.export import export_tower

    out = export_tower(args.run_dir, args.out, args.checkpoint, args.format)
    print(f"{out}: exported ({args.format})")
    return EXIT_OK


def cmd_encode(args: argparse.Namespace) -> int:
    from twotower.serve.commands import encode_command

    encode_command(
        args.out, args.data, args.model, args.run_dir, args.checkpoint, args.rows, args.backend
    )
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from twotower.serve.commands import search_command

    search_command(
        args.out,
        args.k,
        args.data,
        args.model,
        args.run_dir,
        args.checkpoint,
        args.rows,
        args.miner,
        args.exclude_context,
        args.backend,
        args.faiss_index,
    )
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from twotower.diagnose.report import write_report

    print(f"{write_report(args.run_dir, args.out)}: written")
    return EXIT_OK


def add_tower_flags(parser: argparse.ArgumentParser) -> None:
    """--model DIR | --run RUN [--checkpoint], --data, --rows, --backend: which tower on what."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an exported tower directory (`twotower export`)")
    which.add_argument("--run", dest="run_dir", help="a run directory")
    parser.add_argument("--checkpoint", help=f"with --run: {CHECKPOINT_HELP}")
    parser.add_argument("--data", help="dataset (default: the one the tower was trained on)")
    parser.add_argument("--rows", default="all", help="all, train or held-out (the run's split)")
    add_field_flags(parser, "backend", " Here: the engine that encodes.", default="auto")


def _add_train(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`twotower train`: one flag per TrainConfig field, by topic."""
    train = add(
        "train",
        help="train a query tower (supervised by default)",
        usage=TRAIN_USAGE,
        description="Train a query tower. Each flag is a field of twotower.TrainConfig.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(train)
    train.set_defaults(run=cmd_train)


def _add_data_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`synth` and `convert`: datasets."""
    synth = add("synth", help="write a synthetic dataset")
    synth.add_argument("--out", required=True, help="dataset directory to write")
    for flag, (what, default) in SYNTH_SIZES.items():
        synth.add_argument(f"--{flag}", type=int, help=f"{what} (default: {default:,})")
    synth.add_argument(
        "--layout", choices=("ids", "contexts"), default="ids", help="context_ids or vectors"
    )
    synth.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset at --out"
    )
    synth.set_defaults(run=cmd_synth)

    convert = add("convert", help="stream a .npz into a memory-mappable directory")
    convert.add_argument("npz", help="the .npz file")
    convert.add_argument("--out", required=True, help="dataset directory to write")
    convert.add_argument("--key", help="map other key names: bank=emb,positives=pos,...")
    convert.set_defaults(run=cmd_convert)


def _add_eval(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`twotower eval`: the flags that mirror a TrainConfig field are made from it."""
    ev = add("eval", help="recall@1/10/100 and MRR of a run beside the parameter-free baselines")
    ev.add_argument(
        "--run",
        dest="run_dir",
        help="run directory or checkpoint (default: none, an untrained tower)",
    )
    ev.add_argument("--data", help="dataset (default: the run's)")
    ev.add_argument("--checkpoint", help=f"with --run: {CHECKPOINT_HELP}")
    ev.add_argument(
        "--rows",
        choices=("held-out", "all"),
        default="held-out",
        help="the run's held-out rows of the data, or every row (a test set of your own)",
    )
    add_field_flags(ev, "tower", " Without --run; with it, the run's.", default=None)
    ev.add_argument(
        "--no-proj", action="store_true", help="meanpool without projection: the baseline"
    )
    add_field_flags(ev, "backend", " Here: the engine that encodes the queries.", default="auto")
    add_field_flags(ev, "miner", " Here: the search (exact gives the reference numbers).", "exact")
    for name in ("seed", "max_eval"):
        add_field_flags(
            ev, name, f" Default: the run's ({field_default(name)} without --run).", None
        )
    add_field_flags(
        ev, "exclude_context", " With --run, the default is as the run trained.", default=None
    )
    ev.set_defaults(run=cmd_eval)


def _add_crash_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`watch`, `explain`, `backends`, `doctor` and `replay`: crashes and machines."""
    watch = add(
        "watch",
        help="run any command (your own training script) with crash forensics",
        usage="twotower watch [--out DIR] [--keep-core] -- COMMAND...",
    )
    watch.add_argument(
        "--out", default="twotower-watch", help="where crash reports go (default ./twotower-watch)"
    )
    watch.add_argument(
        "--keep-core",
        action="store_true",
        help="keep the core a native crash leaves (Linux), after reading its frames",
    )
    watch.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    watch.set_defaults(run=cmd_watch)

    why = add(
        "explain",
        help="explain crash reports you already have: macOS .ips, twotower reports, a run",
        usage="twotower explain PATH [--exe PROGRAM] | --latest",
    )
    why.add_argument(
        "path", nargs="?", help="an .ips, a twotower crash report (.json) or a run directory"
    )
    why.add_argument(
        "--latest",
        action="store_true",
        help="the newest Python*.ips in ~/Library/Logs/DiagnosticReports (macOS)",
    )
    why.add_argument("--exe", help="a Linux core's program (default: this Python)")
    why.set_defaults(run=cmd_explain)

    engines = add("backends", help="list every backend and miner, available or not, and why")
    engines.set_defaults(run=cmd_backends)

    doctor = add(
        "doctor", help="check versions, OpenMP runtimes, threads, engines, data, memory, disk"
    )
    doctor.add_argument("--data", help="also check this dataset (directory or .npz)")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.set_defaults(run=cmd_doctor)

    rep = add(
        "replay", help="rebuild one step of a run and compare every backend with the reference"
    )
    rep.add_argument("--run", dest="run_dir", required=True, help="run directory")
    rep.add_argument(
        "--step", type=int, required=True, help="steps done before it (as crash reports say)"
    )
    rep.add_argument(
        "--backends", type=parse_list, metavar="A,B", help="default: every available one"
    )
    rep.add_argument("--data", help="the run's dataset, if it has moved")
    rep.set_defaults(run=cmd_replay)


def _add_tower_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`export`, `encode`, `search` and `report`: a trained tower and its run."""
    export = add("export", help="write a run's tower as a self-contained directory")
    export.add_argument("--run", dest="run_dir", required=True, help="run directory")
    export.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    export.add_argument("--out", required=True, help="directory to write")
    export.add_argument(
        "--format",
        default="safetensors",
        help="safetensors (always written), torch (adds tower.pt) or onnx (adds tower.onnx)",
    )
    export.set_defaults(run=cmd_export)

    encode = add("encode", help="encode a dataset's rows into a .npy of query vectors")
    add_tower_flags(encode)
    encode.add_argument("--out", required=True, help=".npy file to write (replaced atomically)")
    encode.set_defaults(run=cmd_encode)

    search = add("search", help="top-k bank rows for a dataset's rows, into a .npz")
    add_tower_flags(search)
    search.add_argument("--k", type=int, default=100, help="results per query")
    add_field_flags(search, "miner", " search takes exact, faiss or hnswlib.", default="exact")
    add_field_flags(search, "faiss_index", "", default=field_default("faiss_index"))
    search.add_argument(
        "--exclude-context",
        action="store_true",
        help="never return a query's own context items (except its positive)",
    )
    search.add_argument("--out", required=True, help=".npz file to write (ids, scores, rows)")
    search.set_defaults(run=cmd_search)

    report = add("report", help="draw a run: losses, evaluations, minings, crashes")
    report.add_argument("--run", dest="run_dir", required=True, help="run directory")
    report.add_argument("--out", help="report.png or report.html (default RUN/report.png)")
    report.set_defaults(run=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The `twotower` parser: one sub-command each, every --help showing its defaults."""
    parser = argparse.ArgumentParser(
        prog="twotower", description="Train two-tower retrieval models that survive native crashes."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=DefaultsShown)
    for add_commands in (
        _add_train,
        _add_data_commands,
        _add_eval,
        _add_crash_commands,
        _add_tower_commands,
    ):
        add_commands(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `twotower` command; returns the exit code."""
    wait_policy.apply()  # before any command loads torch or faiss: their OpenMP reads it once
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as error:
        print(f"twotower: error: {error}", file=sys.stderr)
        return error.exit_code
    except MinerCrashed as error:  # a command with no fallback chain (search): say it, once
        print(f"twotower: error: {error}; run it again, or pass --miner exact", file=sys.stderr)
        return EXIT_GAVE_UP


if __name__ == "__main__":
    sys.exit(main())

"""How often a run evaluates when --eval-every is not given: as often as about 4% of the
training compute allows, and at most 4 times an epoch; and what a run's plan never reaches
(a hard-negative refresh, an evaluation before the end), said at its start.

The cost model (`training.cost`) counts multiply-adds, so the cadence is a pure function of
the config and the data's sizes (the same on every machine and every resume, which keeps
patience and best/ deterministic). Mining is not counted as training, so the real share is
lower when the run mines; the trainer measures and logs the share it actually spent.
"""

from __future__ import annotations

import math
from dataclasses import fields

from twotower.config import TrainConfig
from twotower.training.cost import eval_flops, step_flops
from twotower.training.demo import DEMO_SETTINGS

EVAL_BUDGET = 0.04  # evaluation compute / training compute
EVALS_PER_EPOCH = 4  # at most, however cheap an evaluation is


def round_up(value: float) -> int:
    """`value` rounded up to two significant digits: 8371.2 -> 8400, 94.1 -> 95, 0.3 -> 1."""
    if value <= 1:
        return 1
    unit = 10 ** max(math.floor(math.log10(value)) - 1, 0)
    return int(math.ceil(value / unit - 1e-9) * unit)


def auto_eval_every(
    config: TrainConfig,
    dim: int,
    seq_len: int,
    queries: int,
    bank_rows: int,
    batches_per_epoch: int,
    train_bank_rows: int | None = None,
) -> int:
    """Steps between evaluations: the cost floor (an evaluation's FLOPs over EVAL_BUDGET of
    a step's) or a quarter epoch, whichever is longer, rounded up to 1, 2 or 5 x 10^k.
    train_bank_rows: the training bank's rows (default bank_rows, the evaluation's)."""
    rows = bank_rows if train_bank_rows is None else train_bank_rows
    floor = eval_flops(config, dim, seq_len, queries, bank_rows) / (
        EVAL_BUDGET * step_flops(config, dim, seq_len, rows)
    )
    return round_up(max(floor, batches_per_epoch / EVALS_PER_EPOCH))


def said_by(config: TrainConfig, name: str) -> str:
    """Where the value of field `name` comes from, for a log line: "the default", "the
    demo's setting", else "as --NAME says" (a flag, a --config file, or the run's config.json:
    what the user gave)."""
    value = getattr(config, name)
    default = next(f.default for f in fields(config) if f.name == name)
    if value == default:
        return "the default"
    if config.demo and DEMO_SETTINGS.get(name) == value:
        return "the demo's setting"
    return f"as --{name.replace('_', '-')} says"


def plan_gaps(config: TrainConfig, total: int, eval_every: int) -> list[str]:
    """One line for each thing the run's `total` planned steps never reach, with the flag
    that changes it: a hard-negative refresh (the first is in use at step --mine-every), and
    an evaluation between the start and the end (at `eval_every`, 0 when none is asked for).
    """
    gaps = []
    if config.hard_negatives and config.mine_every >= total:
        unused = f"; --miner {config.miner} is never used" if config.miner != "exact" else ""
        gaps.append(
            f"no hard negatives: the {total} planned steps end before the first refresh, at "
            f"step {config.mine_every} (--mine-every, {said_by(config, 'mine_every')}){unused}; "
            f"pass --mine-every N with N < {total} to mine, or --hard-negatives 0"
        )
    if eval_every >= total:
        stops = " (so --patience never stops it)" if config.patience else ""
        gaps.append(
            f"no evaluation between the start and the end{stops}: the {total} planned steps "
            f"end before the first, at step {eval_every}; pass --eval-every N with N < {total}"
            " to follow it"
        )
    return gaps

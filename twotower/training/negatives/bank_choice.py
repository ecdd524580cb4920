"""`--bank-negatives auto`: the full softmax where it costs a small share of the step, sampled
bank rows otherwise, and why (DESIGN.md, "Negatives from the whole bank").

The cost is counted in multiply-adds, as the evaluation cadence counts it (`training/cost.py`): a
step is forward + backward (about 3 forward passes) of B queries over their candidates, and
the full softmax makes every one of the M bank rows a candidate. Its share is the extra
FLOPs over those of the step without it. On MPS and CUDA the bank's (B, D) x (D, M) products
run much nearer the device's peak than the GRU's T small sequential ones, so the share there
is divided by ACCELERATOR_SPEEDUP (an assumption, logged with the choice). The choice is a
new copy of the config (config.json keeps it, so a resume, on any engine, keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twotower.config import DEFAULT_SAMPLED, TrainConfig
from twotower.errors import UsageError
from twotower.training.cost import step_flops
from twotower.training.resolved import Resolved, resolved_copy

FULL_MAX_SHARE = 0.5  # full while its FLOPs are at most this share of the step's
ACCELERATOR_SPEEDUP = 10.0


@dataclass(frozen=True)
class BankChoice:
    """What `--bank-negatives auto` picked: full | sampled, S, and the reason in words."""

    mode: str
    sampled: int | None
    reason: str


def choose(config: TrainConfig, dim: int, seq_len: int, rows: int, backend: str) -> BankChoice:
    """full or sampled for a bank of `rows` x `dim` and sequences of `seq_len`, on `backend`."""
    if config.sampled_negatives is not None:
        return BankChoice("sampled", config.sampled_negatives, "--sampled-negatives was given")
    base = step_flops(config, dim, seq_len)
    extra = step_flops(config, dim, seq_len, bank_rows=rows, full=True) - base
    accelerated = backend in ("torch-cuda", "torch-mps")
    share = extra / base / (ACCELERATOR_SPEEDUP if accelerated else 1.0)
    cost = f"the full softmax over {rows:,} x {dim} rows adds {share:.2f} of a step's FLOPs" + (
        f" (divided by {ACCELERATOR_SPEEDUP:g} on {backend})" if accelerated else ""
    )
    if share <= FULL_MAX_SHARE:
        return BankChoice("full", None, f"{cost} (at most {FULL_MAX_SHARE})")
    sampled = min(DEFAULT_SAMPLED, rows)
    return BankChoice("sampled", sampled, f"{cost} (over {FULL_MAX_SHARE}): {sampled:,} sampled")


def resolve(
    config: TrainConfig,
    dim: int,
    seq_len: int,
    rows: int,
    backend: str,
    stored: dict[str, Any] | None = None,
) -> Resolved:
    """config with bank_negatives made concrete, as a new copy: auto -> the run's stored choice
    when resuming (`stored` config.json), else `choose`'s; none with --sampled-negatives given
    -> sampled; sampled gets its S (at most M); full sets --hard-negatives and --queue-size to
    0 (those candidates are bank rows already). The line says what changed and why."""
    mode, sampled = config.bank_negatives, config.sampled_negatives
    head, why = f"bank negatives: {mode}", []
    if mode == "none" and sampled is not None:
        mode, head = "sampled", "bank negatives: sampled"
        why.append("--sampled-negatives was given")
    if mode == "auto":
        if stored is not None and stored.get("bank_negatives", "auto") != "auto":
            mode, sampled = stored["bank_negatives"], stored.get("sampled_negatives")
            choice = BankChoice(mode, sampled, "as the run chose at its start (config.json)")
        else:
            choice = choose(config, dim, seq_len, rows, backend)
        mode, sampled = choice.mode, choice.sampled
        head = f"--bank-negatives auto: {mode} ({choice.reason})"
    changes: dict[str, Any] = {"bank_negatives": mode, "sampled_negatives": sampled}
    if mode == "sampled" and sampled is None:
        changes["sampled_negatives"] = sampled = min(DEFAULT_SAMPLED, rows)
        why.append(f"S defaults to {DEFAULT_SAMPLED:,}, at most the bank's {rows:,} rows")
    if mode == "sampled" and sampled is not None and sampled > rows:
        raise UsageError(
            f"--sampled-negatives {sampled} is more than the bank's {rows} rows; "
            "use --bank-negatives full"
        )
    if mode == "full" and (config.hard_negatives or config.queue_size):
        changes.update(hard_negatives=0, queue_size=0)
        why.append("every bank row is already a candidate")
    return resolved_copy(config, head, "; ".join(why), **changes)

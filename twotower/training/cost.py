"""The cost model: multiply-add FLOPs of encoding a query, of a training step and of an
evaluation, from the config and the data's sizes alone (the same on every machine and every
resume). The evaluation cadence, the choice of bank negatives and the thread budget read it.

An evaluation encodes the held-out queries (a forward pass) and scores them against every bank
row (exact search); a step runs forward and backward (about 3 forward passes) over B queries and
their B + K + Q candidates (plus S sampled bank rows, or every bank row with the full softmax).
"""

from __future__ import annotations

from twotower.config import TrainConfig


def encode_flops(config: TrainConfig, dim: int, seq_len: int) -> float:
    """Multiply-add FLOPs of encoding one query of `seq_len` vectors of size `dim`."""
    if config.tower == "meanpool":
        return seq_len * dim + 2.0 * dim * dim
    hidden, per_token = config.hidden, 0.0
    for layer in range(config.layers):
        inputs = dim if layer == 0 else hidden
        per_token += 2.0 * 3 * hidden * (inputs + hidden)
    return seq_len * per_token + 2.0 * dim * hidden


def step_flops(
    config: TrainConfig, dim: int, seq_len: int, bank_rows: int = 0, full: bool | None = None
) -> float:
    """FLOPs of one training step: forward + backward of B queries and their scores.

    Candidates: B + K + Q, plus S sampled bank rows; with the full softmax (`full`, default
    config.bank_negatives == "full") the `bank_rows` rows instead."""
    if full if full is not None else config.bank_negatives == "full":
        candidates = bank_rows
    else:
        candidates = config.batch_size + config.hard_negatives + config.queue_size
        if config.bank_negatives == "sampled":
            candidates += config.sampled_negatives or 0
    forward = config.batch_size * (encode_flops(config, dim, seq_len) + 2.0 * candidates * dim)
    return 3 * forward


def eval_flops(config: TrainConfig, dim: int, seq_len: int, queries: int, bank_rows: int) -> float:
    """FLOPs of one evaluation: encode `queries` and score them against `bank_rows` rows."""
    return queries * (encode_flops(config, dim, seq_len) + 2.0 * bank_rows * dim)

"""`--tensorboard DIR`: the scalars of metrics.jsonl, also written for TensorBoard.

The same numbers `twotower report` draws (train/loss, train/grad_norm,
train/lr, train/ms, train/rss_kb, eval/<metric>, mining/seconds), through
`torch.utils.tensorboard`, which needs the `tensorboard` package.
"""

from __future__ import annotations

import math
from typing import Any

from twotower.config import METRICS
from twotower.errors import UsageError

FLUSH_SECONDS = 10
SCALARS = {
    "step": ("train", ("loss", "grad_norm", "lr", "ms", "rss_kb")),
    "eval": ("eval", METRICS),
    "mined": ("mining", ("seconds", "recall")),
}


def summary_writer_class() -> Any:
    """torch.utils.tensorboard.SummaryWriter; UsageError (one line) when it cannot load."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        missing = getattr(error, "name", None) or "tensorboard"
        raise UsageError(
            f"--tensorboard needs the {missing} package (pip install tensorboard); "
            "or leave --tensorboard out: metrics.jsonl and `twotower report` need none"
        ) from None
    return SummaryWriter


class TensorboardScalars:
    """Receives each metrics.jsonl record and writes its scalars to a TensorBoard log dir."""

    def __init__(self, log_dir: str):
        self.writer = summary_writer_class()(log_dir=log_dir, flush_secs=FLUSH_SECONDS)

    def __call__(self, record: dict[str, Any]) -> None:
        group, keys = SCALARS.get(record["event"], ("", ()))
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, int(record["step"]))

    def close(self) -> None:
        self.writer.close()

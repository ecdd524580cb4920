"""A run's miners, from its config to built indexes: `--miner auto` resolved, every option
checked against the bank before anything is written, then built with the build shown.

`resolve_miner(config, dataset, queries)` resolves `--miner auto` into a new copy of
the config (so config.json and restarts keep the choice) and the line that logs it;
`MinerSetup(config, dataset, on_event)` takes that config; `make(threads)`
makes the mining chain and the evaluation miner (their workers start) and asks
each to check its options against the bank (`Miner.check`): a factory string faiss
cannot parse, more IVF lists than bank rows, a parameter the index lacks is a
UsageError (exit code 2) here, before the run directory is touched. `build()`
then builds them; the build's progress reaches the heartbeat and the log
through `twotower.progress`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twotower import miners
from twotower.config import TrainConfig
from twotower.data import Dataset
from twotower.miners.auto import choose_miner
from twotower.miners.base import check_miner
from twotower.paths import user_cache_dir
from twotower.training.resolved import Resolved

log = logging.getLogger("twotower")


def resolve_miner(config: TrainConfig, dataset: Dataset, queries: int) -> Resolved:
    """config with `--miner auto` made concrete (`miners.auto.choose_miner`: the miner and its
    settings, for the bank's size and `queries`, how many a refresh searches), as a new copy,
    and the line "--miner auto chose faiss (--faiss-index IVF64,Flat): why"."""
    if config.miner != "auto":
        return Resolved(config)
    rows, dim = dataset.bank.shape
    choice = choose_miner(rows, dim, queries, miners.available())
    chosen = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in choice.settings.items())
    settings = f" ({chosen})" if chosen else ""
    after = replace(config, miner=choice.miner, **choice.settings)
    return Resolved(after, f"--miner auto chose {choice.miner}{settings}: {choice.reason}")


class MinerSetup:
    """The mining chain (None without hard negatives) and the evaluation miner of a run.

    config: with --miner resolved (`resolve_miner`). on_event: receives the mining chain's
    crash, restart and switch events.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        on_event: Callable[[dict[str, Any]], None],
    ):
        assert config.miner != "auto", "resolve_miner first"
        self.config = config
        self.dataset = dataset
        self.on_event = on_event
        self.eval_miner: miners.Miner  # made by `make`
        self.miner: miners.Miner | None = None
        self.warnings: list[str] = []
        # the mining miner's raised search parameters ({"nprobe": 8}): a checkpoint keeps
        # them, and a resumed run sets them again after its build (`build`)
        self.search_params: dict[str, int] = {}

    def make(self, threads: int | None) -> None:
        """Make the evaluation miner and the mining chain (its engines get `threads`, the
        thread budget's share of a miner) and check both against the bank."""
        config = self.config
        cache = user_cache_dir() / "index"
        self.eval_miner = miners.get_for(config, config.eval_miner, cache, fault_phase=None)
        if config.hard_negatives:
            chain = [config.miner] + [m for m in config.miner_fallback if m != config.miner]
            per_engine = {name: miners.engine_settings(config, name) for name in chain}
            opts = {**miners.options_for(config, cache), "threads": threads}
            self.miner = miners.chain(chain, self.on_event, per_engine, **opts)
        self.warnings = self._check()

    def _check(self) -> list[str]:
        rows, dim = self.dataset.bank.shape
        warnings = check_miner(self.eval_miner, rows, dim)
        if self.miner is not None:
            warnings += check_miner(self.miner, rows, dim)
        return warnings

    def log_warnings(self) -> None:
        """Log the checks' warnings (once logging is on)."""
        for warning in self.warnings:
            log.warning("%s", warning)

    def raise_after_probe(self, recall: float) -> dict[str, int]:
        """When a refresh's probe measured `recall` below --faiss-target-recall, the mining
        miner searches wider from the next refresh on (`miners.raise_recall`: its tuned
        parameter doubled). Returns the parameters raised ({} when none: at target, set by
        the user, or at their limit)."""
        target = self.config.faiss_target_recall
        if self.miner is None or target is None or recall >= target:
            return {}
        raised = miners.raise_recall(self.miner)
        self.search_params.update(raised)
        return raised

    def build(self, search_params: dict[str, int]) -> None:
        """Build (or load) the evaluation miner's and the mining chain's indexes; log how;
        set the search parameters a resumed run had raised (its checkpoint's, {} when none)."""
        self.search_params = dict(search_params)
        bank, fingerprint = self.dataset.bank, self.dataset.fingerprint
        for role, miner in (("evaluation", self.eval_miner), ("mining", self.miner)):
            if miner is None:
                continue
            miner.build(bank, fingerprint=fingerprint)
            info = dict(getattr(miner, "build_info", {}))
            if info.get("source") in ("built", "loaded"):
                tuned = (
                    f", {info['tuned']} {info[info['tuned']]} tuned to --faiss-target-recall "
                    f"{self.config.faiss_target_recall} (recall@32 {info['tuned_recall']} vs "
                    f"exact on {info['tune_queries']} bank rows)"
                    if "tuned" in info
                    else ""
                )
                log.info(
                    "%s miner %s: index %s in %.1f s%s",
                    role,
                    miner.name,
                    info["source"],
                    info["seconds"],
                    tuned,
                )
        if self.miner is not None and self.search_params:
            miners.use_params(self.miner, self.search_params)
            log.info("mining miner: searches as the run raised it: %s", self.search_params)

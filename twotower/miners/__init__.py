"""Nearest-neighbour miners by name: `available()`, `describe()`, `get(name, **opts)`, `chain()`.

    exact     blocked GEMM over the memory-mapped bank; the oracle for the others
    faiss     any faiss index factory string (Flat, HNSW32, IVF4096,Flat, ...)
    hnswlib   HNSW graph in hnswlib's 'ip' space

Every miner returns (scores, ids) with scores as dot products, best first.
faiss and hnswlib run in a worker process by default (`isolation`), so their
native libraries never load beside torch; `chain("faiss,hnswlib,exact")`
restarts a crashed miner once and then moves down the list (`fallback`).
This module imports no engine library: `engine()` does, where it runs.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twotower.config import MINER_TIMEOUT
from twotower.errors import UsageError
from twotower.miners.base import InProcessMiner, Miner, MinerCrashed, raise_recall, use_params
from twotower.registry import EngineInfo, EngineRegistry, missing_module_reason

__all__ = [
    "raise_recall",
    "use_params",
    "Miner",
    "MinerCrashed",
    "EngineInfo",
    "available",
    "describe",
    "get",
    "chain",
    "engine",
    "engine_settings",
    "get_for",
    "options_for",
    "NAMES",
]


REGISTRY = EngineRegistry(
    "miner",
    {
        "exact": lambda: None,
        "faiss": missing_module_reason("faiss", "faiss-cpu"),
        "hnswlib": missing_module_reason("hnswlib", "hnswlib"),
    },
)
NAMES = REGISTRY.names
describe = REGISTRY.describe
available = REGISTRY.available


ISOLATION_MODES = ("process", "none")
DEFAULT_ISOLATION = {"exact": "none", "faiss": "process", "hnswlib": "process"}
COMMON_OPTIONS = ("threads", "cache_dir")  # passed to each engine that takes them


def isolation_of(name: str, isolation: str | None = None) -> str:
    """Where miner `name` runs: `isolation` if given, else its default ("process" or "none")."""
    return isolation or DEFAULT_ISOLATION[name]


def engine_class(name: str) -> type:
    """The in-process engine class for a known miner name (imports its module, not its library)."""
    if name == "faiss":
        from twotower.miners.faiss_miner import FaissMiner

        return FaissMiner
    if name == "hnswlib":
        from twotower.miners.hnswlib_miner import HnswlibMiner

        return HnswlibMiner
    from twotower.miners.exact import ExactMiner

    return ExactMiner


def engine_options(name: str) -> tuple[str, ...]:
    """The keyword options engine `name` takes (its class's constructor parameters)."""
    return tuple(inspect.signature(engine_class(name)).parameters)


def engine(name: str, **opts: Any) -> Miner:
    """The engine itself, in this process (no isolation): what a worker runs. Loads its library."""
    return engine_class(name)(**opts)  # type: ignore[no-any-return]


def get(
    name: str,
    isolation: str | None = None,
    threads: int | None = None,
    timeout: float = MINER_TIMEOUT,
    cache_dir: str | os.PathLike[str] | None = None,
    fault_phase: str | None = "mine",
    **engine_opts: Any,
) -> Miner:
    """A miner ready for `build(bank)`: in a worker process or in this one.

    isolation: "process" (default for faiss and hnswlib: the engine runs in a
    worker that never imports torch; crashes raise MinerCrashed) or "none"
    (default for exact). threads: the engine's threads, set in the worker
    only when isolated. timeout: seconds a search may take in a worker before
    it is killed. cache_dir: where built indexes are kept. engine_opts: the
    engine's own options (faiss: index, nprobe, ef_search, train_rows, seed;
    hnswlib: M, ef_construction, ef, seed; exact: memory_budget_bytes, progress).
    fault_phase: the fault point each search reaches ("mine"; None for evaluation).
    Raises EngineUnavailable for an unknown or missing miner, UsageError for a bad option.
    """
    REGISTRY.require(name)
    mode = isolation_of(name, isolation)
    if mode not in ISOLATION_MODES:
        raise UsageError(f"miner isolation {mode!r} is not one of {', '.join(ISOLATION_MODES)}")
    takes = engine_options(name)
    unknown = sorted(set(engine_opts) - set(takes))
    if unknown:
        raise UsageError(
            f"miner {name} has no option {', '.join(unknown)}; it takes {', '.join(takes)}"
        )
    common = {"threads": threads, "cache_dir": cache_dir}
    opts = {key: value for key, value in common.items() if key in takes and value is not None}
    opts.update(engine_opts)
    if mode == "none":
        return InProcessMiner(engine(name, **opts), fault_phase)
    from twotower.miners.isolation import IsolatedMiner

    return IsolatedMiner(name, opts, threads=threads, timeout=timeout, fault_phase=fault_phase)


def chain(
    names: str | Sequence[str],
    on_event: Callable[[dict[str, Any]], None] | None = None,
    per_engine: Mapping[str, Mapping[str, Any]] | None = None,
    **opts: Any,
) -> Miner:
    """A miner that falls back along `names` ("faiss,hnswlib,exact" or a sequence) on crashes.

    opts are `get`'s: isolation, threads, timeout and cache_dir go to every
    miner, each engine option to the engines that take it (index to faiss, ef
    to hnswlib, ...). per_engine: options for one engine only, by its name
    ({"faiss": {"ef_construction": 80}, "hnswlib": {"ef_construction": 200}}).
    on_event(dict) receives each crash, restart and switch
    (see `fallback.FallbackMiner`). Raises EngineUnavailable up front for an
    unknown or missing name, UsageError for an option no engine of the chain takes.
    """
    from twotower.miners.fallback import FallbackMiner

    order = [part.strip() for part in names.split(",")] if isinstance(names, str) else list(names)
    for name in order:
        REGISTRY.require(name)
    everyone = ("isolation", "timeout", *COMMON_OPTIONS)
    shared = {key: opts.pop(key) for key in everyone if key in opts}
    taken = {name: engine_options(name) for name in order}
    unused = sorted(key for key in opts if not any(key in takes for takes in taken.values()))
    if unused:
        raise UsageError(f"no miner of {', '.join(order)} has option {', '.join(unused)}")

    def make(name: str) -> Miner:
        own = {key: value for key, value in opts.items() if key in taken[name]}
        own.update((per_engine or {}).get(name, {}))
        return get(name, **shared, **own)

    return FallbackMiner(order, make, on_event)


def options_for(config: Any, cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The options every miner of a TrainConfig takes (`get` / `chain`): isolation, threads,
    timeout and the index cache directory."""
    return {
        "isolation": config.miner_isolation,
        "threads": config.miner_threads,
        "timeout": config.miner_timeout,
        "cache_dir": cache_dir,
    }


# Each engine's own knobs: TrainConfig field -> the engine's keyword option.
MINER_SETTINGS = {
    "faiss": {
        "faiss_index": "index",
        "faiss_nprobe": "nprobe",
        "faiss_ef_search": "ef_search",
        "faiss_ef_construction": "ef_construction",
        "faiss_train_rows": "train_rows",
        "faiss_target_recall": "target_recall",
    },
    "hnswlib": {
        "hnswlib_m": "M",
        "hnswlib_ef_construction": "ef_construction",
        "hnswlib_ef": "ef",
        "faiss_target_recall": "target_recall",
    },
}


def engine_settings(config: Any, name: str) -> dict[str, Any]:
    """Engine `name`'s own options from a TrainConfig's fields (MINER_SETTINGS), those
    the user set: {"index": "IVF1024,Flat", "nprobe": 16} for faiss, {"M": 32} for hnswlib."""
    fields = MINER_SETTINGS.get(name, {})
    return {
        option: getattr(config, field)
        for field, option in fields.items()
        if getattr(config, field) is not None
    }


def get_for(config: Any, name: str, cache_dir: str | os.PathLike[str], **opts: Any) -> Miner:
    """`get(name)` with a TrainConfig's options and engine settings (opts: more of `get`'s)."""
    return get(name, **options_for(config, cache_dir), **engine_settings(config, name), **opts)

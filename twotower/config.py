"""`TrainConfig`: every knob of a run in one dataclass; validation; TOML/JSON in and out.

Every CLI flag of `twotower train` is a field (dashes become underscores);
`--config FILE.toml` fills fields from a file and flags given on the command
line override it. The run directory keeps the resolved config as config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from reference.optim import LR_SCHEDULES
from twotower.errors import UsageError
from twotower.knobs import knob
from twotower.towers import RESIDUALS

TORCHRUN_ID_ENV = "TORCHELASTIC_RUN_ID"

# What a config.json written before a field existed means by leaving it out, where that differs
# from today's default: such a run trained a plain GRU with a constant rate, split at random,
# and mined every training row, encoded at the step of use.
ABSENT_MEANS: dict[str, Any] = {
    "residual": "none",
    "lr_schedule": "constant",
    "warmup_share": 0.0,
    "eval_split": "random",
    "exclude_context": False,
    "mine_scope": "all",
    "mine_lead": 0,
}

# the recall@32 against exact that an approximate miner's unset search parameter is tuned to
DEFAULT_TARGET_RECALL = 0.95

CUTOFFS = (1, 10, 100)  # evaluation: recall@c for each, MRR over the first max(CUTOFFS)
METRICS = (*(f"recall@{c}" for c in CUTOFFS), f"mrr@{max(CUTOFFS)}")
MINER_TIMEOUT = 600.0  # seconds a search may take in a worker before it is presumed hung
EVAL_SPLITS = ("auto", "random", "group")

# Fields a decaying schedule (or a warm-up share) reads through the planned total S: with
# those, a resume with another --steps or --epochs changes the rate of every step after it.
PLAN_FIELDS = ("steps", "epochs")


def default_out() -> str:
    """runs/YYYYmmdd-HHMMSS; under torchrun runs/torchrun-<its run id>, one name for every rank
    and every restart of the launch (a clock could differ between ranks by a second)."""
    run_id = os.environ.get(TORCHRUN_ID_ENV, "none")
    if run_id != "none":
        return str(Path("runs") / f"torchrun-{run_id}")
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


MINE_SCOPES = ("upcoming", "all")
BANK_NEGATIVES = ("auto", "full", "sampled", "none")
DEFAULT_SAMPLED = 8192  # --sampled-negatives when --bank-negatives sampled is chosen


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Paths are strings so the config round-trips through JSON and TOML.

    Frozen: a setting resolved after the config is built (by the data, the bank, the miner, a
    torchrun restart) is a new copy (`dataclasses.replace`, which validates it again), and the
    set-up step that makes it logs what changed and why (`training/resolved.py`).
    """

    # data and output
    data: str | None = knob(
        None,
        "The dataset: a directory of .npy files, or a .npz file. Needed unless --demo, or "
        "--resume of a run that names it.",
        numeric=True,
    )
    out: str | None = knob(
        None,
        "The run directory. Default: runs/YYYYmmdd-HHMMSS (under torchrun, runs/torchrun-RUN_ID).",
    )
    demo: bool = knob(
        False,
        "Train on built-in synthetic data (written on first use), with settings that finish "
        "in about half a minute on two CPU cores.",
    )
    # model
    tower: str = knob(
        "gru", "The query tower: gru or meanpool.", numeric=True, choices=("gru", "meanpool")
    )
    proj: bool = knob(
        True,
        "Meanpool: learn a projection.",
        no_help="Meanpool without a projection: the parameter-free baseline (`twotower eval` "
        "evaluates it; there is nothing to train).",
        numeric=True,
    )
    residual: str | None = knob(
        None,
        "GRU: last, q = normalize(last context vector + proj(h)) with proj starting at 0, so "
        "training starts at the last-item baseline; or none, the plain GRU. Default: last for "
        "gru (meanpool: none).",
        numeric=True,
        choices=RESIDUALS,
    )
    hidden: int = knob(768, "The GRU's hidden size H.", numeric=True, at_least=1)
    layers: int = knob(1, "GRU layers L.", numeric=True, at_least=1)
    # engines
    backend: str = knob(
        "auto",
        "The compute engine: numpy, torch-cpu, torch-mps, torch-cuda, or auto (torch-cpu where "
        "torch is installed, else numpy).",
    )
    fallback: list[str] = knob(
        lambda: ["numpy"], "Backends to switch to, in order, when one keeps crashing."
    )
    gru_path: str | None = knob(
        None, "Torch's GRU: packed or masked. Default: masked on MPS, packed elsewhere."
    )
    miner: str = knob(
        "exact",
        "The hard-negative miner: exact, faiss, hnswlib, or auto (chosen by the bank's and a "
        "refresh's size).",
    )
    miner_fallback: list[str] = knob(
        lambda: ["exact"], "Miners to switch to, in order, when one crashes."
    )
    miner_isolation: str | None = knob(
        None,
        "Where the miner searches: process (a worker of its own) or none (in the trainer). "
        "Default: process for faiss and hnswlib, none for exact.",
    )
    threads: int | None = knob(
        None,
        "Threads of the trainer. Default: every core, and its share while the miner worker "
        "searches beside training.",
        at_least=1,
    )
    miner_threads: int | None = knob(
        None,
        "Threads of the miner worker. Default: every core, and its share while it searches "
        "beside training.",
        at_least=1,
    )
    miner_timeout: float = knob(
        MINER_TIMEOUT, "Seconds a miner may go without answering before it is killed."
    )
    faiss_index: str = knob(
        "Flat", "The faiss index factory string: Flat, HNSW32, IVF4096,Flat, ..."
    )
    faiss_nprobe: int | None = knob(
        None,
        "Faiss IVF: lists searched per query. Default: tuned to --faiss-target-recall.",
        at_least=1,
    )
    faiss_ef_search: int | None = knob(
        None, "Faiss HNSW: efSearch. Default: tuned to --faiss-target-recall.", at_least=1
    )
    faiss_ef_construction: int | None = knob(
        None, "Faiss HNSW: efConstruction. Default: 40.", at_least=1
    )
    faiss_train_rows: int | None = knob(
        None,
        "Faiss IVF or PQ: bank rows sampled to train the index. Default: max(10k, 40 a list).",
        at_least=1,
    )
    faiss_target_recall: float | None = knob(
        DEFAULT_TARGET_RECALL,
        "The recall@32 against exact search that an unset --faiss-nprobe, --faiss-ef-search "
        "or --hnswlib-ef is tuned to after the build, and raised to when a refresh's recall "
        "probe measures below it.",
    )
    hnswlib_m: int | None = knob(None, "The hnswlib graph's degree M. Default: 16.", at_least=1)
    hnswlib_ef_construction: int | None = knob(
        None, "The hnswlib graph's ef_construction. Default: 200.", at_least=1
    )
    hnswlib_ef: int | None = knob(
        None, "The hnswlib search's ef. Default: tuned to --faiss-target-recall.", at_least=1
    )
    eval_miner: str = knob(
        "exact", "The engine that searches at evaluation (exact gives the reference numbers)."
    )
    tensorboard: str | None = knob(
        None, "Also write the scalars to this directory, for TensorBoard. Default: none."
    )
    # schedule
    steps: int | None = knob(
        None,
        "Steps to train. Default: as many as --epochs passes over the training rows take.",
        at_least=1,
    )
    epochs: float = knob(1.0, "Passes over the training rows, when --steps is not given.")
    batch_size: int = knob(32, "Queries a step trains on, B.", numeric=True, at_least=1)
    # negatives
    hard_negatives: int = knob(
        8, "Mined hard negatives K a query; 0 turns mining off.", numeric=True, at_least=0
    )
    mine_every: int = knob(
        500,
        "Steps between hard-negative refreshes; the first table is in use from step "
        "--mine-every, so a shorter run never mines.",
        numeric=True,
        at_least=1,
    )
    mine_scope: str = knob(
        "upcoming",
        "The rows a refresh mines: upcoming (those the next --mine-every steps train on) or all.",
        numeric=True,
        choices=MINE_SCOPES,
    )
    mine_lead: int | None = knob(
        None,
        "Steps between encoding a refresh's queries and putting its table into use (0: "
        "encode at the step of use). Default: --mine-every // 4.",
        numeric=True,
    )
    mine_overlap: bool | None = knob(
        None,
        "Search while training goes on (the numbers stay the same). Default: when the miner "
        "searches in a process of its own.",
        no_help="Search while training waits, even when the miner has a process of its own.",
    )
    mine_probe: int = knob(
        64, "Queries of each approximate refresh also searched exactly, to measure its recall."
    )
    min_mining_recall: float = knob(
        0.9, "Warn when an approximate miner's recall against exact search is below this."
    )
    mine_skip: int = knob(
        0,
        "Top mined ranks to skip: a table keeps ranks [skip, skip + pool).",
        numeric=True,
        at_least=0,
    )
    mine_pool: int = knob(32, "Mined candidates kept a query.", numeric=True, at_least=1)
    absolute_margin: float | None = knob(
        None,
        "Drop a mined candidate scoring above the positive's score minus this. Default: off.",
        numeric=True,
    )
    relative_margin: float | None = knob(
        None,
        "Drop a mined candidate scoring above (1 - this) x the positive's. Default: off.",
        numeric=True,
    )
    max_score: float | None = knob(
        None, "Drop a mined candidate scoring above this. Default: off.", numeric=True
    )
    queue_size: int = knob(
        4096, "The memory-bank queue's size Q; 0 turns it off.", numeric=True, at_least=0
    )
    bank_negatives: str = knob(
        "none",
        "Negatives from the whole frozen bank: full (every row; in-batch, hard and queue "
        "candidates then unused), sampled (--sampled-negatives rows a step, after the queue), "
        "auto (full where its cost is a small share of the step, else sampled; the choice and "
        "its reason are logged), or none.",
        numeric=True,
        choices=BANK_NEGATIVES,
    )
    sampled_negatives: int | None = knob(
        None,
        f"Bank rows drawn per step, shared by the batch. Default: {DEFAULT_SAMPLED}; with "
        "--bank-negatives none, giving it means sampled.",
        numeric=True,
        at_least=1,
    )
    logq: bool = knob(
        False,
        "Subtract log(freq / N) (freq: how often an item is a training positive) from the "
        "in-batch and queue candidates' scores.",
        numeric=True,
    )
    exclude_context: bool | None = knob(
        None,
        "Mask a query's own context items out of its negatives and its evaluation ranking. "
        "Default: on when the data has context_ids.npy.",
        no_help="Keep a query's own context items among its negatives and in its evaluation "
        "ranking.",
        numeric=True,
    )
    # loss and optimizer
    temperature: float = knob(0.05, "The InfoNCE temperature tau.", numeric=True)
    lr: float = knob(1e-3, "The AdamW learning rate (the peak, with a schedule).", numeric=True)
    lr_schedule: str = knob(
        "cosine",
        "The rate after warm-up: constant, linear or cosine (the last two decay to 0 at the "
        "planned last step).",
        numeric=True,
        choices=LR_SCHEDULES,
    )
    warmup_steps: int | None = knob(
        None,
        "Linear warm-up steps W; wins over --warmup-share. Default: --warmup-share of the "
        "planned steps.",
        numeric=True,
        at_least=0,
    )
    warmup_share: float = knob(
        0.05, "Warm-up as a share of the planned steps, rounded up.", numeric=True
    )
    weight_decay: float = knob(0.01, "AdamW's decoupled weight decay.", numeric=True)
    max_grad_norm: float = knob(1.0, "The global gradient-norm clip.", numeric=True)
    seed: int = knob(
        0,
        "The seed of the initial parameters, the held-out split, the batch order and sampling.",
        numeric=True,
    )
    # bookkeeping
    checkpoint_every: int = knob(
        200,
        "Steps between checkpoints (one is also written at the end, and on Ctrl-C).",
        at_least=1,
    )
    keep_checkpoints: int = knob(
        3, "Checkpoints kept; the oldest is pruned once a new one is committed.", at_least=1
    )
    eval_every: int | None = knob(
        None,
        "Steps between evaluations on the held-out rows (0: at the start and the end only). "
        "Default: as often as about 4 percent of the training compute allows, at most 4 "
        "times an epoch.",
        at_least=0,
    )
    eval_fraction: float = knob(0.05, "The held-out share of the samples.", numeric=True)
    max_eval: int = knob(2000, "Held-out queries, at most.", numeric=True)
    eval_split: str = knob(
        "auto",
        "How held-out rows are chosen: random, group (whole groups of groups.npy), or auto "
        "(group when the data has groups).",
        numeric=True,
        choices=EVAL_SPLITS,
    )
    eval_data: str | None = knob(
        None,
        "A validation dataset to evaluate on instead of held-out rows. Default: none.",
        numeric=True,
    )
    select_metric: str = knob(
        "mrr@100",
        f"The held-out metric best/ keeps the best of: {', '.join(METRICS)}.",
        choices=METRICS,
    )
    patience: int = knob(
        0, "Stop after this many evaluations without improvement (0: never stop early).", at_least=0
    )
    # supervision
    max_restarts: int = knob(
        3, "Restarts after crashes before giving up (exit code 3).", at_least=0
    )
    hang_timeout: float | None = knob(
        None,
        "Seconds without a heartbeat before the watchdog ends a stalled trainer. Default: no "
        "watchdog.",
    )
    keep_core: bool = knob(
        False, "Keep the core a native crash leaves (Linux) after reading its native frames."
    )
    resume: bool = knob(
        False,
        "Continue the run in --out from its newest valid checkpoint, with the settings in its "
        "config.json; a flag beside it may change only what leaves the numbers the same "
        "(engines, threads, logging, timeouts).",
    )
    supervise: bool = knob(
        True,
        "Train in a supervised child process, restarted after a native crash.",
        no_help="Train in this process, without a supervisor: a native crash ends the run.",
    )
    deterministic: bool = knob(False, "Torch: use_deterministic_algorithms.")
    # torchrun
    collective_timeout: float = knob(
        1800.0, "Torchrun: seconds a rank waits in a collective for the others before failing."
    )

    def __post_init__(self) -> None:
        # the defaults that depend on the clock or another field, set while the copy is built
        if self.out is None:
            object.__setattr__(self, "out", default_out())
        if self.residual is None:
            object.__setattr__(self, "residual", "last" if self.tower == "gru" else "none")
        self.validate()

    def validate(self) -> None:
        """Raise UsageError with one line naming the first field that is out of range: each
        field's own bounds (`knob`'s at_least and choices), then the rules between fields."""
        for f in fields(self):
            value, flag = getattr(self, f.name), f"--{f.name.replace('_', '-')}"
            at_least, choices = f.metadata.get("at_least"), f.metadata.get("choices")
            if value is None:
                continue
            if at_least is not None and value < at_least:
                raise UsageError(f"{flag} must be >= {at_least}, got {value}")
            if choices is not None and value not in choices:
                raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        recall = self.faiss_target_recall
        if recall is not None and not 0 < recall <= 1:
            raise UsageError(f"--faiss-target-recall must be in (0, 1], got {recall}")
        if self.epochs <= 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        if self.collective_timeout <= 0:
            raise UsageError(f"--collective-timeout must be > 0, got {self.collective_timeout}")
        if self.temperature <= 0 or self.lr <= 0 or self.max_grad_norm <= 0:
            raise UsageError("--temperature, --lr and --max-grad-norm must be > 0")
        if not 0 < self.eval_fraction < 1:
            raise UsageError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.mine_lead is not None and not 0 <= self.mine_lead < self.mine_every:
            raise UsageError(
                f"--mine-lead must be in 0..{self.mine_every - 1} (below --mine-every), "
                f"got {self.mine_lead}"
            )
        if self.mine_probe < 0 or not 0.0 <= self.min_mining_recall <= 1.0:
            raise UsageError("--mine-probe must be >= 0 and --min-mining-recall in [0, 1]")
        if not 0 <= self.warmup_share < 1:
            raise UsageError(f"--warmup-share must be in [0, 1), got {self.warmup_share}")
        if self.residual != "none" and self.tower != "gru":
            raise UsageError("--residual is a gru option (meanpool already starts at the mean)")
        if self.data is None and not self.demo:
            raise UsageError("no data: give --data DIR|FILE.npz, or --demo for built-in demo data")

    def for_data(self, has_context_ids: bool) -> TrainConfig:
        """This config with its data-dependent default made concrete: exclude_context None ->
        whether the data has context ids (seen-item masking needs them)."""
        if self.exclude_context is not None:
            return self
        return replace(self, exclude_context=has_context_ids)

    # --- in and out ----------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys are a UsageError naming the source."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise UsageError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def mining_lead(self) -> int:
        """Steps between a mining's encoding and the use of its table: --mine-lead, else
        --mine-every // 4."""
        return self.mine_every // 4 if self.mine_lead is None else self.mine_lead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def numeric_fields(self) -> tuple[str, ...]:
        """NUMERIC_FIELDS, plus --steps and --epochs when the lr schedule reads the plan."""
        plan_matters = self.lr_schedule != "constant" or (
            self.warmup_steps is None and self.warmup_share > 0
        )
        return NUMERIC_FIELDS + (PLAN_FIELDS if plan_matters else ())

    def numeric_hash(self) -> str:
        """sha256 (16 hex digits) of the fields that change a run's numbers."""
        numeric = {name: getattr(self, name) for name in NUMERIC_FIELDS}
        return hashlib.sha256(json.dumps(numeric, sort_keys=True).encode()).hexdigest()[:16]

    def numeric_differences(self, other: dict[str, Any]) -> list[str]:
        """'name: theirs -> ours' for each numeric field that differs from `other`.

        A field `other` lacks (a run made before that option existed) counts as what such a
        run did (ABSENT_MEANS), else as its default.
        """
        defaults = {f.name: f.default for f in fields(self)} | ABSENT_MEANS
        return [
            f"{name}: {other.get(name, defaults[name])!r} -> {getattr(self, name)!r}"
            for name in self.numeric_fields()
            if other.get(name, defaults[name]) != getattr(self, name)
        ]


# Fields that change the numbers a run computes. Resuming with another value of one of
# these is refused; everything else (engines, checkpoint cadence, output) may change.
NUMERIC_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.metadata["numeric"])

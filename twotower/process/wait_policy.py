"""How idle OpenMP threads wait: twotower's default OMP_WAIT_POLICY=PASSIVE, unless the user chose.

An OpenMP worker thread that finishes its share of a parallel region spins,
waiting for its partners and the next region (GNU OpenMP: 300,000 spins by
default; LLVM's and Intel's: KMP_BLOCKTIME, 200 ms). On a quiet machine that
saves a wake-up. On a busy one (another process computing on the same cores)
the partner it waits for is descheduled, and the spinning thread burns the
very time slice the partner needs: a 2-core machine beside a 2-thread BLAS job
ran the demo's steps 35x slower with every core than with one thread. PASSIVE
threads sleep at once; measured side by side (bench/test_busy_machine.py,
docs/BENCHMARKS.md) they keep a busy machine within about 1.1x of one thread,
where spinning took 4-28x, so PASSIVE is the default and no thread count
changes at run time.

The runtime reads the variable once, when it loads: it must be in the
environment before torch or faiss is imported. `apply` sets it in this process
(the CLI does, first thing) and `child_env` in a child's environment (the
supervisor's trainer, the miner worker). A user who set OMP_WAIT_POLICY,
GOMP_SPINCOUNT or KMP_BLOCKTIME chose how their threads wait: all are left as
they are. `describe` says which applies, and whether it came too late (an
OpenMP runtime already loaded, as in `twotower.train()` after `import torch`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

POLICY_VARIABLE = "OMP_WAIT_POLICY"
DEFAULT_POLICY = "PASSIVE"
# a user's own choice of how threads wait: any of these leaves the environment alone
USER_CHOICES = (POLICY_VARIABLE, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SET_BY_TWOTOWER = "TWOTOWER_SET_WAIT_POLICY"  # marks OMP_WAIT_POLICY as twotower's, not the user's
OPENMP_MODULES = ("torch", "faiss")  # importing either loads an OpenMP runtime


def user_choice(env: Mapping[str, str]) -> dict[str, str]:
    """The wait variables a user set in `env` ({} when none or only twotower's own)."""
    chosen = {name: env[name] for name in USER_CHOICES if name in env}
    if env.get(SET_BY_TWOTOWER) and chosen.get(POLICY_VARIABLE) == DEFAULT_POLICY:
        chosen.pop(POLICY_VARIABLE)
    return chosen


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with twotower's wait policy added, unless the user chose one in it."""
    out = dict(env)
    if not user_choice(env):
        out[POLICY_VARIABLE] = DEFAULT_POLICY
        out[SET_BY_TWOTOWER] = "1"
    return out


def apply() -> bool:
    """Set twotower's wait policy in this process's environment, unless the user chose one or
    an OpenMP runtime has loaded already (too late: it would not apply). Returns whether set."""
    if user_choice(os.environ) or any(name in sys.modules for name in OPENMP_MODULES):
        return False
    os.environ[POLICY_VARIABLE] = DEFAULT_POLICY
    os.environ[SET_BY_TWOTOWER] = "1"
    return True


def describe() -> str:
    """This process's policy in words, for the log: whose it is and whether it took effect."""
    chosen = user_choice(os.environ)
    if chosen:
        settings = ", ".join(f"{name}={value}" for name, value in chosen.items())
        return f"{settings} (yours)"
    if os.environ.get(SET_BY_TWOTOWER) and os.environ.get(POLICY_VARIABLE) == DEFAULT_POLICY:
        return f"{POLICY_VARIABLE}={DEFAULT_POLICY} (twotower's default: idle threads sleep)"
    loaded = [name for name in OPENMP_MODULES if name in sys.modules]
    return (
        f"each runtime's default: idle threads spin ({', '.join(loaded) or 'OpenMP'} loaded "
        f"before twotower could set {POLICY_VARIABLE}={DEFAULT_POLICY}; set it before "
        "importing torch on a busy machine)"
    )

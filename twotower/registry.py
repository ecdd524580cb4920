"""Name -> engine tables for backends and miners, each engine with its availability.

An engine says whether this machine can run it and, if not, why ("MPS needs
macOS on Apple silicon"); asking for one it cannot run is a one-line
`EngineUnavailable` listing the ones that are available, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twotower.errors import EngineUnavailable


@dataclass(frozen=True)
class EngineInfo:
    """One known engine: its name, whether this machine can run it, and why (not)."""

    name: str
    available: bool
    reason: str


class EngineRegistry:
    """Known engines of one role ("backend", "miner"), in order of preference.

    `unavailable_reason[name]()` returns None when the engine runs here, else why not.
    """

    def __init__(self, role: str, unavailable_reason: dict[str, Callable[[], str | None]]):
        self.role = role
        self.unavailable_reason = unavailable_reason

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.unavailable_reason)

    def describe(self) -> list[EngineInfo]:
        """Every known engine, available or not, with the reason."""
        infos = []
        for name, reason_of in self.unavailable_reason.items():
            reason = reason_of()
            infos.append(EngineInfo(name, reason is None, reason or "ok"))
        return infos

    def available(self) -> list[str]:
        """Names of the engines this machine can run."""
        return [info.name for info in self.describe() if info.available]

    def require(self, name: str) -> None:
        """Raise EngineUnavailable unless `name` is known and runs here."""
        if name not in self.unavailable_reason:
            raise EngineUnavailable(f"unknown {self.role} {name!r}; known: {', '.join(self.names)}")
        reason = self.unavailable_reason[name]()
        if reason is not None:
            raise EngineUnavailable(
                f"{name} is not available here ({reason}); available: {', '.join(self.available())}"
            )


def missing_module_reason(module: str, pip_name: str) -> Callable[[], str | None]:
    """A reason function: None if `module` can be imported, else how to install it.

    It only looks the module up (importlib.util.find_spec) and never imports it,
    so listing engines does not load their native libraries.
    """
    import importlib.util

    def reason() -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {pip_name})"
        return None

    return reason

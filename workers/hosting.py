"""What a kernel's supervisor and the warm set use of the worker that runs them.

``poolgate.workers.runtime.Runtime`` is the one implementation; it creates supervisors and the warm set,
so they see it through this Protocol and import nothing of it (imports run one way:
runtime → supervisor → warm → hosting).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config
from .registry import Registry

if TYPE_CHECKING:
    from .launchers.base import Launcher


class WorkerHost(Protocol):
    """One worker process's state, as its supervisors and warm set see it."""

    config: Config
    name: str
    pools: list[str]
    slots: int
    used: int
    registry: Registry
    supervisors: dict[str, Any]  # kernel id -> its poolgate.workers.supervisor.Supervisor
    shutting_down: threading.Event

    def launcher(self, pool: str) -> Launcher:
        """The pool's launcher, created on first use."""

    def take_slot(self) -> None:
        """A kernel starts: one slot fewer (the last pauses the worker's consumers)."""

    def release_slot(self) -> None:
        """A kernel ended: its slot is free again."""

    def take_warm(self, pool: str, req: Any) -> tuple[Any, dict[str, Any]]:
        """A ready warm kernel made ``req``'s (a LaunchRequest), or None; and the note for the
        launch's timing."""

    def beat(self) -> None:
        """Write the worker's heartbeat now."""

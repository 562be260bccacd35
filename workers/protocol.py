"""The data that crosses between gateway, registry and workers, and the kernel lifecycle.

The lifecycle is one table, :data:`TRANSITIONS`; :func:`advance` is the only check of it::

    QUEUED → STARTING → RUNNING ⇄ RESTARTING → STOPPING → STOPPED
    FAILED is reachable from every live state; STOPPED and FAILED are final.

The registry enforces the same table atomically (see ``workers/registry.py``).
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class KernelStatus(str, enum.Enum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def live(self) -> bool:
        return self not in (KernelStatus.STOPPED, KernelStatus.FAILED)


S = KernelStatus
TRANSITIONS: dict[KernelStatus, frozenset[KernelStatus]] = {
    S.QUEUED: frozenset({S.STARTING, S.STOPPED, S.FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.FAILED}),
    S.RUNNING: frozenset({S.RESTARTING, S.STOPPING, S.FAILED}),
    S.RESTARTING: frozenset({S.RUNNING, S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}


class InvalidTransition(Exception):
    """A state change the lifecycle table does not allow."""


def advance(current: KernelStatus, new: KernelStatus) -> KernelStatus:
    """Return ``new`` if the table allows ``current → new``, else raise InvalidTransition."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current.value} -> {new.value}")
    return new


def sources_of(new: KernelStatus) -> frozenset[KernelStatus]:
    """The states from which ``new`` may be reached."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if new in nxt)


#: execution_state that a client sees for each registry status (RUNNING shows the kernel's own).
EXECUTION_STATE = {
    S.QUEUED: "starting",
    S.STARTING: "starting",
    S.RESTARTING: "restarting",
    S.STOPPING: "terminating",
    S.STOPPED: "dead",
    S.FAILED: "dead",
}


@dataclass(frozen=True)
class ConnectionInfo:
    """Where a kernel listens: what a Jupyter connection file holds."""

    ip: str
    shell_port: int
    iopub_port: int
    stdin_port: int
    control_port: int
    hb_port: int
    key: str
    transport: str = "tcp"
    signature_scheme: str = "hmac-sha256"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectionInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def url(self, channel: str) -> str:
        port = getattr(self, f"{channel}_port")
        if self.transport == "ipc":
            return f"ipc://{self.ip}-{port}"
        return f"tcp://{self.ip}:{port}"


@dataclass(frozen=True)
class LaunchRequest:
    """What a launcher needs to start one kernel; sent as the kernels.host task's argument."""

    kernel_id: str
    pool: str
    spec_name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    spec_env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    working_dir: str = ""
    launch_timeout: float = 60.0
    resources: dict[str, Any] = field(default_factory=dict)
    interrupt_mode: str = "signal"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchRequest:
        names = cls.__dataclass_fields__
        kw = {k: v for k, v in data.items() if k in names}
        kw["argv"] = tuple(kw.get("argv", ()))
        return cls(**kw)


@dataclass
class KernelHandle:
    """JSON-able data a launcher needs to find its kernel again (pid, container, pod…)."""

    kernel_id: str
    pool: str
    host: str = ""
    connection: ConnectionInfo | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel_id": self.kernel_id,
            "pool": self.pool,
            "host": self.host,
            "connection": self.connection.to_dict() if self.connection else None,
            "data": dict(self.data),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelHandle:
        conn = data.get("connection")
        return cls(
            kernel_id=data["kernel_id"],
            pool=data["pool"],
            host=data.get("host", ""),
            connection=ConnectionInfo.from_dict(conn) if conn else None,
            data=dict(data.get("data") or {}),
        )

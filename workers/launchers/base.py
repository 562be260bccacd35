"""The one small interface every launcher implements."""
from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..protocol import KernelHandle, LaunchRequest

PORT_IN_USE = "Address already in use"  # what a kernel that could not bind a port prints
#: The worker's own credentials: kernels run users' code and never get them (DESIGN.md).
WORKER_SECRETS = ("POOLGATE_BROKER_URL", "POOLGATE_REGISTRY_URL", "POOLGATE_REGISTRY_SECRET",
                  "POOLGATE_AUTH_TOKEN", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


def without_worker_secrets(env: dict[str, str]) -> dict[str, str]:
    """``env`` (a worker's environment) less what would give a kernel the broker or registry."""
    return {k: v for k, v in env.items() if k not in WORKER_SECRETS}

if TYPE_CHECKING:
    from ..config import PoolConfig
    from ..registry import Registry


@dataclass(frozen=True)
class NoOptions:
    """A launcher that takes no options."""


class Launcher(abc.ABC):
    """Starts and controls kernels for one pool.

    Keeps no state between calls that another worker could not rebuild from a handle: any
    worker on the pool's queue may get the stop for a kernel another worker launched.
    """

    Options: ClassVar[type[Any]] = NoOptions

    def __init__(self, pool: PoolConfig, options: Any, runtime_dir: str) -> None:
        self.pool = pool
        self.options = options
        self.runtime_dir = runtime_dir
        self.registry: Registry | None = None

    def attach(self, registry: Registry) -> None:
        """Called by the worker's Runtime once, right after creating the launcher. A launcher
        whose state must be shared by every worker on its pool (ssh placement) keeps it there."""
        self.registry = registry

    def prepare(self) -> None:
        """Called once when the worker starts, before any launch: start what makes launches
        quick (the local launcher's fork server)."""

    def close(self) -> None:
        """Called when the worker stops, after its kernels are stopped."""

    @abc.abstractmethod
    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        """Called by the supervisor. Yield a handle after each step that creates something;
        the last one carries the connection info of a kernel that answers requests.

        ``previous`` is the handle of the same kernel when it is restarted: reuse its key and,
        where possible, its ports. If launch raises or times out, stop() gets the last handle.
        """

    @abc.abstractmethod
    def poll(self, handle: KernelHandle) -> str | None:
        """None while the kernel lives; else a short reason why it ended."""

    @abc.abstractmethod
    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        """Send ``signum`` to the kernel's process group (or the backend's equivalent)."""

    @abc.abstractmethod
    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        """Make sure the kernel and everything launch created are gone.

        Called after the supervisor asked the kernel to shut down; waits up to ``grace``
        seconds, then kills. Idempotent: stopping a stopped or half-launched kernel is fine.
        """

    @classmethod
    def runs_here(cls, options: Any) -> str | None:
        """None if ``poolgate serve`` can run this launcher on this machine; else why not."""
        return "it needs a resource manager; start its workers with 'poolgate worker'"

    @classmethod
    def default_slots(cls, options: Any) -> int | None:
        """Called by ``poolgate worker`` when no ``--slots`` is given: how many kernels this
        worker can host at once, from what its machine has (a gpu worker's free GPUs). None: use
        the pool's ``slots``. 0: it can host none, and the worker does not start; runs_here()
        says why."""
        return None

    def warm_fits(self, warm: KernelHandle, started_for: LaunchRequest,
                  req: LaunchRequest) -> str:
        """Called by the worker's warm set (workers/warm.py) before it hands a warm kernel,
        which ``launch`` started for ``started_for``, to ``req``: '' if it can become ``req``'s
        kernel, else why not (the launch then starts cold and its timing says why). The warm set
        has already compared resources; a launcher adds what it decides at start (a remote user,
        an image). A launcher that cannot hand kernels over at all says so here."""
        return ""

    def take_over(self, warm: KernelHandle, kernel_id: str) -> KernelHandle:
        """Called by the warm set once ``warm_fits`` said yes: ``warm`` as kernel ``kernel_id``.
        A launcher that keyed something by the warm kernel's id (an ssh place) moves it here;
        ``data`` keeps what stop() needs to find the warm kernel's own resources."""
        return KernelHandle(kernel_id, warm.pool, warm.host, warm.connection, dict(warm.data))

    def failure_detail(self, handle: KernelHandle) -> str:
        """The tail of the kernel's own output, for a launch or death that needs explaining."""
        return ""

    def port_taken(self, handle: KernelHandle) -> bool:
        """Whether the kernel's output says one of its ports was taken. ipykernel 7 does not
        exit then: its ZMQ context waits forever on the sockets it bound before the one that
        failed, so the process looks alive; a launch asks this while it waits for an answer."""
        return PORT_IN_USE in self.failure_detail(handle)

"""The only gateway module that talks to Celery: send launches, control commands, revokes."""
from __future__ import annotations

import logging

from ..workers.config import Config, PoolConfig
from ..workers.errors import BackendUnavailable

log = logging.getLogger(__name__)


def _not_watched(producer: object, task_id: str) -> None:
    """The gateway does not subscribe to the results of the tasks it sends."""


class Dispatcher:
    """Sends ``kernels.host`` tasks and ``poolgate_kernel`` remote-control commands."""

    def __init__(self, config: Config) -> None:
        from ..workers.celery_app import make_celery

        self.app = make_celery(config)
        # send_task subscribes the sender to each task's result channel (the backend's
        # on_task_call) for an AsyncResult to wait on. The gateway never waits on a launch's
        # result (the registry says how a kernel is doing), and nothing read that connection:
        # redis-py kept every channel name and the unread confirmations piled up, one lot per
        # launch, for the gateway's life. The worker still stores the result.
        self.app.backend.on_task_call = _not_watched

    def launch(self, kernel_id: str, pool: PoolConfig, spec: str, user: str,
               expires: float) -> None:
        """Queue the launch of ``kernel_id`` on the pool's queue; it expires with its timeout."""
        try:
            self.app.send_task("kernels.host", task_id=kernel_id, queue=pool.queue,
                               routing_key=pool.queue, expires=expires,
                               kwargs={"kernel_id": kernel_id, "pool": pool.name,
                                       "kernelspec": spec, "user": user},
                               retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2})
        except Exception as exc:
            raise BackendUnavailable(f"cannot queue the launch on pool {pool.name!r}: the broker "
                                     f"is unreachable ({exc})") from exc

    def control(self, worker: str, kernel_id: str, action: str) -> None:
        """Tell the worker hosting ``kernel_id`` to ``action`` it (interrupt, restart, stop).

        Fire and forget: callers wait for the kernel's registry events instead of a reply.
        (Replies to concurrent broadcasts from one process share kombu's reply queue and
        steal each other's answers, which made every concurrent DELETE wait its full timeout.)
        The registry's ``target`` is the durable intent; a lost command only costs time.
        """
        try:
            self.app.control.broadcast(
                "poolgate_kernel", arguments={"kernel_id": kernel_id, "action": action},
                destination=[worker], reply=False)
        except Exception as exc:
            raise BackendUnavailable(f"cannot reach worker {worker}: {exc}") from exc

    def revoke(self, kernel_id: str) -> None:
        try:
            self.app.control.revoke(kernel_id)
        except Exception:
            log.warning("Could not revoke the launch of kernel %s", kernel_id, exc_info=True)

"""The only gateway module that talks to Celery: send launches, control commands, revokes."""
from __future__ import annotations

import logging
from typing import Any

from workers.config import Config, PoolConfig
from workers.errors import BackendUnavailable, ControlTimeout, from_data

log = logging.getLogger(__name__)


class Dispatcher:
    """Sends ``kernels.host`` tasks and ``poolgate_kernel`` remote-control commands."""

    def __init__(self, config: Config) -> None:
        from workers.celery_app import make_celery

        self.app = make_celery(config)

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

    def control(self, worker: str, kernel_id: str, action: str, timeout: float) -> dict[str, Any]:
        """Ask the worker hosting ``kernel_id`` to ``action`` it; returns the worker's reply."""
        try:
            replies = self.app.control.broadcast(
                "poolgate_kernel", arguments={"kernel_id": kernel_id, "action": action},
                destination=[worker], reply=True, timeout=timeout)
        except Exception as exc:
            raise BackendUnavailable(f"cannot reach worker {worker}: {exc}") from exc
        for reply in replies or []:
            if worker in reply:
                answer: dict[str, Any] = reply[worker]
                if not answer.get("ok", False):
                    raise from_data(answer)
                return answer
        raise ControlTimeout(f"worker {worker} did not answer '{action}' for kernel {kernel_id} "
                             f"within {timeout:.0f}s")

    def revoke(self, kernel_id: str) -> None:
        try:
            self.app.control.revoke(kernel_id)
        except Exception:
            log.warning("Could not revoke the launch of kernel %s", kernel_id, exc_info=True)

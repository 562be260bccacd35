"""kernels.host: the long-running task that is one kernel's whole life (thin wrapper)."""
from __future__ import annotations

from typing import Any

from celery import Celery


def register(app: Celery) -> None:
    """Add the kernel tasks to ``app`` (called by make_celery)."""

    @app.task(name="kernels.host", bind=True, ignore_result=False, acks_late=False,
              time_limit=None, soft_time_limit=None, track_started=True)
    def host(self: Any, kernel_id: str, pool: str, kernelspec: str = "",
             user: str = "") -> dict[str, Any]:
        """Launch kernel ``kernel_id`` on ``pool`` and supervise it until it ends."""
        from workers.supervisor import Supervisor

        runtime = self.app.poolgate_runtime
        return Supervisor(runtime, kernel_id, pool, task=self).run()

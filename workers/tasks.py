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
        from .logs import bound
        from .supervisor import Supervisor

        runtime = self.app.poolgate_runtime
        with bound(kernel_id=kernel_id, pool=pool, user=user):
            return Supervisor(runtime, kernel_id, pool, task=self).run()

    @app.task(name="poolgate.reconcile", ignore_result=True)
    def reconcile() -> dict[str, Any]:
        """Periodic (Celery beat): bring the registry into agreement with what is alive."""
        from .reconcile import reconcile as run
        from .registry import Registry

        config = app.poolgate_config  # type: ignore[attr-defined]
        return run(Registry(config.registry_url, config.registry_secret), config.pools)

"""make_celery(config): the Celery app, one queue per pool, JSON only, built for long tasks.

The settings follow DESIGN.md: early ack, no prefetch, no time limits on kernel tasks, a
threads pool whose size is the worker's kernel slots, task events on for Flower.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_shutting_down
from celery.worker.control import control_command
from kombu.entity import Queue

from .broker_tls import split_amqps
from .config import Config

log = logging.getLogger(__name__)
_RUNTIMES: list[Any] = []
MAINTENANCE_QUEUE = "poolgate.maintenance"


def result_backend_url(registry_url: str) -> str:
    """Celery's result backend lives in the registry's Redis."""
    return registry_url.replace("unix://", "redis+socket://", 1)


def make_celery(config: Config, slots: int | None = None, runtime_dir: str | None = None) -> Celery:
    """Build the Celery app for ``config``; workers and gateways both use it."""
    broker, broker_ssl = split_amqps(config.broker_url)  # amqps:// with ssl_* parameters
    app = Celery("poolgate", broker=broker,
                 backend=result_backend_url(config.registry_url), set_as_current=False)
    if broker_ssl is not None:
        app.conf.broker_use_ssl = broker_ssl
    is_redis = config.broker_url.startswith(("redis", "unix"))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=is_redis,
        worker_pool="threads",
        worker_concurrency=slots or max(p.slots for p in config.pools.values()),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_time_limit=None,
        task_soft_time_limit=None,
        result_extended=True,
        result_expires=86400,
        task_queues=[Queue(p.queue, routing_key=p.queue) for p in config.pools.values()],
        task_default_queue=config.pools[config.default_pool].queue,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 7 * 86400},
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        # One result backend (and Redis connection pool) per process, not one per thread:
        # every kernel's supervisor thread reports RUNNING through it, and a backend per thread
        # kept a Redis connection open per kernel (issue 24: 500 per worker of 500 kernels)
        result_backend_thread_safe=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Celery reduces the prefetch count after a broker reconnect while tasks run, and
        # restores it as they complete: kernel tasks never complete, and a worker that
        # reconnected to a restarted RabbitMQ received a launch and never started it
        # (celery/celery#9512, #7515). Kernels are early-acked: nothing to over-fetch.
        worker_enable_prefetch_count_reduction=False,
        enable_utc=True,
    )
    app.conf.beat_schedule = {"poolgate-reconcile": {
        "task": "poolgate.reconcile", "schedule": config.reconcile_interval,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": config.reconcile_interval}}}
    app.poolgate_config = config  # type: ignore[attr-defined]
    app.poolgate_runtime_dir = runtime_dir or os.path.join(  # type: ignore[attr-defined]
        tempfile.gettempdir(), f"poolgate-{os.getuid()}")
    from . import tasks

    tasks.register(app)
    app.steps["consumer"].add(PoolgateStep)
    control_command(name="poolgate_kernel", args=[("kernel_id", str), ("action", str)],
                    signature="<kernel_id> <action>")(_kernel_command)
    control_command(name="poolgate_drain", args=[("pool", str), ("resume", bool)],
                    signature="<pool> [resume]")(_drain_command)
    return app


def _kernel_command(state: Any, kernel_id: str, action: str) -> dict[str, Any]:
    """Remote control: run in the worker's main thread; hands the action to the supervisor."""
    runtime = getattr(state.consumer.app, "poolgate_runtime", None)
    if runtime is None:
        return {"ok": False, "error": "backend_unavailable", "message": "worker not ready"}
    result: dict[str, Any] = runtime.command(kernel_id, action)
    return result


def _drain_command(state: Any, pool: str, resume: bool = False) -> dict[str, Any]:
    """Remote control: stop (or resume) taking launches of ``pool`` on this worker."""
    runtime = getattr(state.consumer.app, "poolgate_runtime", None)
    if runtime is None:
        return {"ok": False, "error": "backend_unavailable", "message": "worker not ready"}
    result: dict[str, Any] = runtime.drain(pool, on=not resume)
    return result


class PoolgateStep(bootsteps.StartStopStep):
    """Consumer bootstep: creates the worker's Runtime once its queues are known."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from .runtime import Runtime

        app = c.app
        rt = getattr(app, "poolgate_runtime", None)
        if rt is None:
            queues = sorted(q.name for q in app.amqp.queues.consume_from.values())
            if queues == [MAINTENANCE_QUEUE]:
                return  # the maintenance worker hosts no kernels
            rt = Runtime(app.poolgate_config, c.hostname, queues, c.pool.num_processes,
                         app.poolgate_runtime_dir)
            app.poolgate_runtime = rt
            _RUNTIMES.append(rt)
            rt.start()
            log.info("Worker %s: %d slots for pools %s", rt.name, rt.slots, ", ".join(rt.pools))
        rt.consumer = c
        rt.sync_consumer()  # reconnected while full or drained: stay paused


@worker_shutting_down.connect(weak=False)
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    for rt in _RUNTIMES:
        rt.shutting_down.set()  # no more heartbeats: the worker leaves /api/pools now
        try:
            rt.registry.worker_gone(rt.name)
        except Exception:
            log.debug("cannot remove the worker's heartbeat", exc_info=True)
        for sup in list(rt.supervisors.values()):
            sup.command("shutdown-worker")
        if getattr(rt, "warm", None) is not None:
            rt.warm.stop_all()
        # Supervisors of adopted kernels are not Celery tasks: the pool would not wait for them.
        deadline = time.monotonic() + 20
        while rt.supervisors and time.monotonic() < deadline:
            time.sleep(0.05)
        for launcher in list(rt._launchers.values()):  # the fork server, ssh links
            launcher.close()

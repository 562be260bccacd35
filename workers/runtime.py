"""What one worker process holds: its launchers, slots, supervisors and heartbeat.

Created by the ``PoolgateStep`` consumer bootstep when the worker starts. Its slots gate the
queue: when the last slot fills, the worker cancels its consumers so waiting launches stay in
the broker's queue, in order, for any worker; a freed slot adds them back.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import launchers
from .config import Config
from .registry import WORKER_TTL, Registry
from .supervisor import Supervisor, reap_orphans
from .warm import WarmSet, reap_warm

if TYPE_CHECKING:
    from .launchers.base import Launcher

log = logging.getLogger(__name__)


class Runtime:
    """The per-process state of a pool worker."""

    def __init__(self, config: Config, name: str, queues: list[str], slots: int,
                 runtime_dir: str) -> None:
        self.config = config
        self.name = name
        self.queues = queues
        self.pools = [p.name for p in config.pools.values() if p.queue in queues]
        self.slots = slots
        self._epoch: dict[str, Any] | None = None  # the registry's data as this worker knows it
        self.runtime_dir = runtime_dir
        self.registry = Registry(config.registry_url, config.registry_secret)
        self.supervisors: dict[str, Supervisor] = {}
        self.shutting_down = threading.Event()
        self._launchers: dict[str, Launcher] = {}
        self._lock = threading.Lock()
        self.used = 0
        self.consumer: Any = None
        self._paused = False
        self.drained: set[str] = set()  # queues an operator drained: never re-added on their own
        self._beat: threading.Thread | None = None

    def launcher(self, pool: str) -> Launcher:
        with self._lock:
            if pool not in self._launchers:
                folder = Path(self.runtime_dir) / pool
                folder.mkdir(parents=True, exist_ok=True)
                self._launchers[pool] = launchers.create(self.config.pools[pool], str(folder))
                self._launchers[pool].attach(self.registry)
            return self._launchers[pool]

    # -- slots ----------------------------------------------------------------------------

    def take_slot(self) -> None:
        with self._lock:
            self.used += 1
            full = self.used >= self.slots and not self._paused
            if full:
                self._paused = True
        if full:
            log.info("Worker %s: all %d slots in use; not taking launches", self.name, self.slots)
            self.sync_consumer()
        self.beat()

    def take_warm(self, pool: str, req: Any) -> tuple[Any, dict[str, Any]]:
        """A ready warm kernel made ``req``'s, or None; and the note for the launch's timing
        (see workers/warm.py)."""
        warm = getattr(self, "warm", None)
        return warm.take(pool, req) if warm is not None else (None, {})

    def release_slot(self) -> None:
        with self._lock:
            self.used -= 1
            resume = self._paused and self.used < self.slots and not self.shutting_down.is_set()
            if resume:
                self._paused = False
        if resume:
            log.info("Worker %s: a slot is free; taking launches again", self.name)
            self.sync_consumer()
        self.beat()

    def sync_consumer(self) -> None:
        """Make the worker's consumer match the slots and drains, in the consumer's thread.

        Not "cancel" and "add" commands: Celery's hub runs the callbacks of one tick in no
        set order (``Hub._ready`` is a set), and a slot taken and one freed on two threads at
        once queue theirs in either order anyway. A cancel run after the add that should
        follow it left a worker with free slots consuming nothing, for good: the full-pool
        stall of docs/scale.md. Each call instead reads the wanted state when it runs, so
        whichever runs last leaves the consumer as the state is now.
        """
        c = self.consumer
        if c is not None:
            c.call_soon(self._apply_consumer, c)

    def _apply_consumer(self, c: Any) -> None:
        if c is not self.consumer:  # a reconnect replaced it; its own sync follows
            return
        with self._lock:
            paused, drained = self._paused, set(self.drained)
        tc = c.task_consumer
        for q in self.queues:
            want = not paused and q not in drained
            if tc is None or want == tc.consuming_from(q):
                continue
            if want:
                c.add_task_queue(q)
            else:
                c.cancel_task_queue(q)

    # -- heartbeat ------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "pools": self.pools,
                "queues": self.queues, "slots": self.slots, "used": self.used,
                "accepting": not self._paused and not self.shutting_down.is_set(),
                "draining": [p for p in self.pools if self.config.pools[p].queue in self.drained],
                # a count, not the ids: this is written at every launch and end, and every
                # launch on any gateway reads every worker's (issue 24: the ids made both grow
                # with the kernels a worker hosts)
                "kernels": len(self.supervisors), "time": time.time(),
                "warm": warm.counts() if (warm := getattr(self, "warm", None)) else {},
                "warm_rss": warm.rss() if warm else {}}

    def beat(self) -> None:
        if self.shutting_down.is_set():  # gone from /api/pools at once, not "paused" for 10 s
            return
        try:
            self.registry.worker_heartbeat(self.name, self.info(), WORKER_TTL)
        except Exception:
            log.warning("Worker %s: cannot reach the registry", self.name, exc_info=True)

    def start(self) -> None:
        self.registry.mark_epoch()
        self._epoch = self.registry.epoch()
        self.registry.check_keys()
        for pool in self.pools:
            self.launcher(pool).prepare()
        reap_warm(self)
        self.warm = WarmSet(self)
        reaped = reap_orphans(self)
        if reaped:
            log.warning("Worker %s: stopped %d kernels left from before a restart", self.name, reaped)
        self.beat()

        def loop() -> None:
            # Kernel heartbeats come from this thread, not from the supervisors, so a kernel
            # that takes long to restart is not mistaken for one whose worker died. They go
            # every third of the kernels' TTL, the worker's own every third of WORKER_TTL: a
            # command per kernel at the worker's pace cost a third more (issue 24).
            kernel_every = min(p.heartbeat_ttl / 3 for p in self.config.pools.values())
            next_kernels = next_worker = time.monotonic() + min(kernel_every, WORKER_TTL / 3)
            while not self.shutting_down.wait(max(0.0, min(next_kernels, next_worker)
                                                  - time.monotonic())):
                now = time.monotonic()
                if now >= next_kernels:
                    next_kernels = now + kernel_every
                    try:
                        beats = {kid: sup.pool.heartbeat_ttl
                                 for kid, sup in list(self.supervisors.items()) if sup.beating}
                        if beats:
                            self.registry.heartbeats(beats, self.name)
                    except Exception:
                        log.warning("Worker %s: cannot reach the registry", self.name,
                                    exc_info=True)
                    self._rebuild_if_lost()
                if now >= next_worker:
                    next_worker = now + WORKER_TTL / 3
                    self.beat()

        self._beat = threading.Thread(target=loop, name="poolgate-heartbeat", daemon=True)
        self._beat.start()
        self.warm.start()

    def _rebuild_if_lost(self) -> None:
        """The registry lost its data (a Redis that keeps nothing restarted): write our
        kernels' records again at once, then start a new epoch. An epoch other than the one
        this worker knew means the same: another worker saw the loss first (this one was
        busy, or stopped) and started the new epoch; our records are still missing."""
        try:
            epoch = self.registry.epoch()
            if epoch is not None and epoch == self._epoch:
                return
            log.warning("Worker %s: the registry lost its data; restoring %d kernel records",
                        self.name, len(self.supervisors))
            for sup in list(self.supervisors.values()):
                sup.restore_record()
            self.beat()
            self.registry.mark_epoch(rebuilt=True)
            self._epoch = self.registry.epoch()
        except Exception:
            log.warning("Worker %s: cannot reach the registry", self.name, exc_info=True)

    def command(self, kernel_id: str, action: str) -> dict[str, Any]:
        sup = self.supervisors.get(kernel_id)
        if sup is None:
            return {"ok": False, "error": "kernel_not_found",
                    "message": f"worker {self.name} does not host kernel {kernel_id}"}
        sup.command(action)
        return {"ok": True}

    def drain(self, pool: str, on: bool = True) -> dict[str, Any]:
        """Stop (``on``) or resume taking launches of ``pool``; running kernels are not touched.

        Called by the ``poolgate_drain`` control command in the worker's main thread. A drained
        queue stays cancelled when a slot frees, until it is resumed.
        """
        if pool not in self.pools:
            return {"ok": False, "error": "unknown_pool",
                    "message": f"worker {self.name} does not serve pool {pool!r}"}
        queue = self.config.pools[pool].queue
        with self._lock:
            (self.drained.add if on else self.drained.discard)(queue)
        self.sync_consumer()
        log.info("Worker %s: %s pool %s (%d kernels running)", self.name,
                 "draining" if on else "resuming", pool, len(self.supervisors))
        self.beat()
        return {"ok": True, "worker": self.name, "pool": pool, "draining": on,
                "kernels": len(self.supervisors)}

"""EventHub: one pub/sub listener per gateway that hands kernel state changes to waiters.

Waiters never rely on events alone: :meth:`Waiter.wait` also re-reads the registry, so a missed
event (a registry blip) costs latency, not correctness.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..workers.registry import Registry

log = logging.getLogger(__name__)
Listener = Callable[[dict[str, Any]], None]


class EventHub:
    """Subscribes to every kernel's event channel and calls the listeners of that kernel."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._listeners: dict[str, set[Listener]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolgate-events", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def stop(self, wait: float = 0.0) -> None:
        """End the listener; with ``wait``, wait that long for its thread to end (it looks
        every second)."""
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join(wait)

    def add(self, kid: str, fn: Listener) -> None:
        with self._lock:
            self._listeners.setdefault(kid, set()).add(fn)

    def remove(self, kid: str, fn: Listener) -> None:
        with self._lock:
            fns = self._listeners.get(kid)
            if fns is not None:
                fns.discard(fn)
                if not fns:
                    del self._listeners[kid]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ps = self.registry.pubsub()
                ps.psubscribe(self.registry.events_prefix + "*")
                self._ready.set()
                while not self._stop.is_set():
                    msg = ps.get_message(timeout=1.0)
                    if msg and msg.get("type") == "pmessage":
                        self._dispatch(msg["data"])
            except Exception:
                log.warning("Event listener lost the registry; reconnecting", exc_info=True)
                self._ready.set()
                self._stop.wait(1.0)

    def _dispatch(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        with self._lock:
            fns = list(self._listeners.get(event.get("id", ""), ()))
        for fn in fns:
            try:
                fn(event)
            except Exception:
                log.exception("Event listener failed")

    def waiter(self, kid: str) -> Waiter:
        return Waiter(self, kid)


class Waiter:
    """Collects one kernel's events until closed; use as a context manager."""

    def __init__(self, hub: EventHub, kid: str) -> None:
        self.hub = hub
        self.kid = kid
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        hub.add(kid, self.events.put)

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hub.remove(self.kid, self.events.put)

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds (then re-read the registry)."""
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

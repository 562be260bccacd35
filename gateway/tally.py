"""Cluster-wide tallies of how kernels end: failures and culls by pool and reason.

Rule: a tally is counted once for the whole cluster, from the registry's event channels, by
whichever gateway sees the event first (``SET NX`` on a per-event key), and kept in the
registry's Redis, so every gateway replica, ``/metrics``, ``/api/pools``, the dashboard and
``poolgate status`` report the same numbers. Keys (prefix ``pg:``)::

    pg:tally             hash: "<failures|culls>|<pool>|<kind>" -> count
    pg:fails:<pool>      list: the last failures of the pool, newest first (JSON)
    pg:tallied:<id>:<s>  marks an event (kernel id, status) as counted; expires after an hour

Classifying is pure (:func:`classify`); the listener thread only reads events and writes keys.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..workers.registry import PREFIX, Registry

log = logging.getLogger(__name__)
KEEP_FAILURES = 20
MARK_TTL = 3600
FAILURE_KINDS = ("launch_failed", "launch_timeout", "restart_failed", "crashed", "worker_lost",
                 "worker_shutdown", "error")
CULL_KINDS = ("idle", "max_age", "other")


@dataclass(frozen=True)
class Ending:
    """What a kernel's end counts as: ``what`` is "failures" or "culls"."""

    what: str
    kind: str


def classify(status: str, reason: str, previous: str = "") -> Ending | None:
    """How a state change counts, or None when it is no failure and no cull.

    ``previous`` is the status this listener saw last for the kernel (STARTING means the
    kernel failed while launching). Pure: tested against literal reasons.
    """
    text = reason.lower()
    if status == "STOPPED":
        if "launch timed out" in text:
            return Ending("failures", "launch_timeout")
        if "cull" in text:
            kind = ("idle" if "idle" in text else
                    "max_age" if any(w in text for w in ("age", "lifetime", "longer than")) else
                    "other")
            return Ending("culls", kind)
        return None
    if status != "FAILED":
        return None
    if "worker" in text and ("lost" in text or "heartbeat" in text):
        return Ending("failures", "worker_lost")
    if "declared dead" in text:
        return Ending("failures", "worker_lost")
    if "worker" in text and "restarted" in text:  # it died, came back and stopped them
        return Ending("failures", "worker_shutdown")
    if "worker" in text and "shut down" in text:  # an operator stopped it: no pool failure
        return None
    if "times in a row" in text:
        return Ending("failures", "crashed")
    if previous == "RESTARTING" or "failed to restart" in text:
        return Ending("failures", "restart_failed")
    if previous == "STARTING" or any(w in text for w in ("launch failed", "failed to start",
                                                          "while starting")):
        return Ending("failures", "launch_failed")
    return Ending("failures", "error")


def first_line(reason: str, limit: int = 300) -> str:
    """The first line of a reason (launch failures append the kernel's output below it)."""
    line = reason.strip().splitlines()[0] if reason.strip() else ""
    return line[:limit]


class Tally:
    """Reads and (from the listener) writes the cluster-wide tallies."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.r = registry.r

    def counts(self) -> dict[tuple[str, str, str], int]:
        """(what, pool, kind) -> count."""
        out: dict[tuple[str, str, str], int] = {}
        raw: dict[bytes, bytes] = self.r.hgetall(PREFIX + "tally")  # type: ignore[assignment]
        for field, value in raw.items():
            parts = field.decode().split("|", 2)
            if len(parts) == 3:
                out[(parts[0], parts[1], parts[2])] = int(value)
        return out

    def failures(self, pool: str, limit: int = KEEP_FAILURES) -> list[dict[str, Any]]:
        """The pool's last failures, newest first."""
        raw = self.r.lrange(PREFIX + "fails:" + pool, 0, limit - 1)
        return [json.loads(item) for item in raw]

    def count(self, kid: str, status: str, pool: str, ending: Ending, reason: str,
              user: str = "") -> bool:
        """Count one ending once for the cluster; False when another gateway already did."""
        if not self.r.set(f"{PREFIX}tallied:{kid}:{status}", "1", nx=True, ex=MARK_TTL):
            return False
        pipe = self.r.pipeline()
        pipe.hincrby(PREFIX + "tally", f"{ending.what}|{pool}|{ending.kind}", 1)
        if ending.what == "failures":
            entry = {"time": time.time(), "kernel_id": kid, "user": user, "kind": ending.kind,
                     "reason": first_line(reason)}
            pipe.lpush(PREFIX + "fails:" + pool, json.dumps(entry))
            pipe.ltrim(PREFIX + "fails:" + pool, 0, KEEP_FAILURES - 1)
        pipe.execute()
        return True


class TallyListener:
    """A daemon thread that tallies failures and culls from every kernel's event channel."""

    def __init__(self, registry: Registry,
                 on_launch: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.tally = Tally(registry)
        self.registry = registry
        self.on_launch = on_launch  # (pool, timing) of each first launch, once in the cluster
        self._last: dict[str, str] = {}  # kernel id -> last status seen (for launch failures)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolgate-tally", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = 0.0) -> None:
        """End the listener; with ``wait``, wait that long for its thread to end (it looks
        every second)."""
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join(wait)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ps = self.registry.pubsub()
                ps.psubscribe(self.registry.events_prefix + "*")
                while not self._stop.is_set():
                    msg = ps.get_message(timeout=1.0)
                    if msg and msg.get("type") == "pmessage":
                        self.handle(json.loads(msg["data"]))
            except Exception:
                log.warning("Tally listener lost the registry; reconnecting", exc_info=True)
                self._stop.wait(1.0)

    def handle(self, event: dict[str, Any]) -> None:
        """Count one event (called by the listener thread)."""
        kid, status = str(event.get("id", "")), str(event.get("status", ""))
        if status == "RUNNING" and isinstance(event.get("timing"), dict):
            self._launched(kid, event)
        previous = self._last.pop(kid, "") if status in ("STOPPED", "FAILED", "DELETED") else \
            self._last.get(kid, "")
        if status not in ("STOPPED", "FAILED", "DELETED"):
            if status != "STOPPING":  # keep the state the kernel was in when it began to end
                self._last[kid] = status
            if len(self._last) > 100_000:  # events of kernels whose end this gateway missed
                self._last.clear()
            return
        reason = str(event.get("reason", ""))
        ending = classify(status, reason, previous)
        if ending is None:
            return
        pool = str(event.get("pool") or self.registry.get_field(kid, "pool") or "")
        user = str(event.get("user") if "user" in event else self.registry.get_field(kid, "user")
                   or "")
        if pool and self.tally.count(kid, status, pool, ending, reason, user):
            log.info("Kernel %s on pool %s counted as %s (%s): %s", kid, pool, ending.what,
                     ending.kind, first_line(reason))

    def _launched(self, kid: str, event: dict[str, Any]) -> None:
        """A first launch is RUNNING: the one gateway that claims it records its durations."""
        if self.on_launch is None or not event.get("pool"):
            return
        if self.registry.r.set(f"{PREFIX}tallied:{kid}:RUNNING", "1", nx=True, ex=MARK_TTL):
            self.on_launch(str(event["pool"]), event["timing"])

"""Bring the registry into agreement with what is really alive (shared by gateways and the
maintenance task; registry operations only).

* a live kernel whose supervisor stopped beating is FAILED ("worker lost"), so clients see dead;
  not while the registry rebuilds after losing its data (the heartbeats were lost with it),
  and only when a later look, after its worker had its chance to beat again, finds it still
  missing (a paused machine expires every heartbeat at once: Registry.missing_for);
* a launch still queued past its timeout is withdrawn, so it never starts later;
* connection entries of gateways that went away (confirmed as kernels' are) are dropped, so
  culling can see the truth.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .config import PoolConfig
from .protocol import KernelStatus
from .registry import GATEWAY_BEAT, KernelRecord, Registry

log = logging.getLogger(__name__)
S = KernelStatus
SILENT_STATES = (S.RUNNING, S.RESTARTING, S.STOPPING)


def confirm_after(beat: float) -> float:
    """How long a heartbeat written every ``beat`` seconds must stay missing before its writer
    is taken for gone: past the writer's next beat, with a second to be scheduled in."""
    return max(1.5 * beat, beat + 1.0)


def settle(registry: Registry, rec: KernelRecord, pools: Mapping[str, PoolConfig]
           ) -> tuple[KernelRecord | None, bool]:
    """Check one record; returns (the record now or None if gone, True if it was withdrawn)."""
    if rec.status is S.QUEUED and time.time() > rec.created + rec.launch_timeout + 1:
        ok, _ = registry.transition(rec.id, S.STOPPED, pool=rec.pool,
                                    reason="launch timed out in the queue")
        if ok:
            registry.delete(rec.id, rec.pool, reason="launch timed out in the queue")
        return registry.get(rec.id), ok
    if rec.status in SILENT_STATES and not registry.heartbeat_alive(rec.id):
        if registry.rebuilding():
            # The registry lost its data (a restarted Redis): the heartbeats went with it, and
            # a supervisor may write its record again before its worker's next heartbeat. No
            # heartbeat proves nothing until the workers had their chance to write them.
            return rec, False
        ttl = pools[rec.pool].heartbeat_ttl if rec.pool in pools else 0
        if registry.missing_for("hb:" + rec.id) < confirm_after(ttl / 3):
            return rec, False  # its worker may be beating again in a moment
        reason = f"worker {rec.worker} lost: no heartbeat for {ttl:.0f}s; the kernel is considered dead"
        ok, _ = registry.transition(rec.id, S.FAILED, pool=rec.pool, reason=reason,
                                    execution_state="dead")
        if ok:
            log.warning("Kernel %s: %s", rec.id, reason)
            registry.expire_failed(rec.id)
        return registry.get(rec.id), False
    return rec, False


def settle_all(registry: Registry, records: list[KernelRecord], pools: Mapping[str, PoolConfig]
               ) -> Iterator[tuple[KernelRecord, KernelRecord | None, bool]]:
    """settle() for many records: (the record, the record now or None, withdrawn) for each.

    Their heartbeats are read in one round trip (one each made a list of 10,000 kernels
    10,000 round trips, issue 24); a record is checked on its own only when its heartbeat is
    missing or it is queued."""
    alive = registry.beating([r.id for r in records if r.status in SILENT_STATES])
    for rec in records:
        if rec.status in SILENT_STATES and rec.id in alive:
            yield rec, rec, False  # what settle() would find
        else:
            yield rec, *settle(registry, rec, pools)


def reconcile(registry: Registry, pools: Mapping[str, PoolConfig]) -> dict[str, Any]:
    """One pass over every record; returns what it changed.

    Heartbeats and connection entries are read for all records in one round trip each."""
    failed, withdrawn, dropped = [], [], 0
    gateways = registry.live_gateways()
    records = registry.all()
    holders = registry.connection_holders([r.id for r in records])
    silent = {h.decode().split(":", 1)[0] for held in holders.values() for h in held} - gateways
    gateways |= {g for g in silent if registry.missing_for("gw:" + g) < confirm_after(GATEWAY_BEAT)}
    for rec, now, gone in settle_all(registry, records, pools):
        if gone:
            withdrawn.append(rec.id)
        elif now is not None and now.status is S.FAILED and rec.status is not S.FAILED:
            failed.append(rec.id)
        dropped += registry.drop_connections(rec.id, keep=gateways, holders=holders[rec.id])
    if failed or withdrawn or dropped:
        log.info("Reconciled: %d kernels dead (worker lost), %d launches withdrawn, %d stale "
                 "connections dropped", len(failed), len(withdrawn), dropped)
    return {"failed": failed, "withdrawn": withdrawn, "connections_dropped": dropped}

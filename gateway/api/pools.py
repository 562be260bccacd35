"""GET /api/pools[/<name>]: each pool's workers, capacity, queue, kernels and recent failures.

Rule: one reading of the registry (:func:`read_state`) and pure builders (:func:`build_pool`
and the ``build_*`` helpers) make every operator's view, so ``/api/pools``, ``/metrics``, the
``/pools`` dashboard and ``poolgate status`` always agree. Capacity is what live workers report
in their heartbeats (``pg:w:<name>``); a worker that serves several pools shares its slots, and
each of those pools shows them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, jsonify

from ...workers.config import Config, PoolConfig
from ...workers.errors import UnknownPool, cut
from ...workers.protocol import EXECUTION_STATE, KernelStatus
from ...workers.reconcile import settle_all
from ...workers.registry import KernelRecord, Registry
from ..state import state
from ..tally import Tally

bp = Blueprint("pools", __name__)
S = KernelStatus


@dataclass
class ClusterState:
    """What the registry holds about pools at one moment."""

    workers: list[dict[str, Any]]
    records: list[KernelRecord]
    queued: dict[str, list[str]]
    failures: dict[str, list[dict[str, Any]]]
    tallies: dict[tuple[str, str, str], int] = field(default_factory=dict)
    now: float = 0.0


def read_state(config: Config, registry: Registry) -> ClusterState:
    """Read workers, kernel records, queues and failures. The kernels are settled as
    ``/api/kernels`` settles them (``workers/reconcile.py``), so the two always agree: a kernel
    whose supervisor stopped beating is FAILED (worker lost) once a second look confirms it,
    and a launch withdrawn from its queue is left out."""
    tally = Tally(registry)
    records = [now for _, now, _ in settle_all(registry, registry.all(), config.pools)
               if now is not None]
    names = list(config.pools)
    return ClusterState(workers=registry.workers(), records=records,
                        queued={p: registry.queued(p) for p in names},
                        failures={p: tally.failures(p) for p in names},
                        tallies=tally.counts(), now=time.time())


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


def activity_age(last_activity: str, now: float) -> float | None:
    """Seconds since a ``last_activity`` timestamp (Jupyter's ISO format, with its fraction of
    a second, as ``age`` keeps it), None if unknown."""
    import datetime

    try:
        then = datetime.datetime.fromisoformat(last_activity.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, round(now - then.timestamp(), 1))


def _count(kernels: Any) -> int:
    """A worker heartbeat's kernel count (a list of ids from workers before issue 24)."""
    return len(kernels) if isinstance(kernels, list) else int(kernels or 0)


def build_worker(info: dict[str, Any], pool: str, now: float) -> dict[str, Any]:
    """A worker as one pool sees it, from its heartbeat."""
    slots, used = int(info.get("slots", 0)), int(info.get("used", 0))
    draining = pool in info.get("draining", ())
    accepting = bool(info.get("accepting", True)) and not draining
    state = "draining" if draining else "full" if used >= slots else \
        "accepting" if accepting else "paused"
    return {"name": info.get("name", ""), "host": info.get("host", ""), "slots": slots,
            "used": used, "free": max(0, slots - used), "state": state, "draining": draining,
            "kernels": _count(info.get("kernels", 0)),
            "warm": _of_pool(info.get("warm"), pool),
            "warm_rss": _of_pool(info.get("warm_rss"), pool),
            "last_seen": round(max(0.0, now - float(info.get("time", now))), 1)}


def build_kernel(rec: KernelRecord, now: float, position: int | None = None) -> dict[str, Any]:
    """A kernel as the operator sees it: owner, age and activity, never its env or key."""
    out: dict[str, Any] = {
        "id": rec.id, "kernelspec": rec.name, "user": rec.user, "status": rec.status.value,
        "execution_state": (rec.execution_state if rec.status is S.RUNNING
                            else EXECUTION_STATE[rec.status]),
        "worker": rec.worker, "host": rec.host, "created": iso(rec.created),
        "age": round(max(0.0, now - rec.created), 1) if rec.created else None,
        "last_activity": rec.last_activity, "idle": activity_age(rec.last_activity, now),
        "connections": rec.connections}
    if position is not None:
        out["queue_position"] = position
    return out


def status_counts(records: list[KernelRecord]) -> dict[str, int]:
    counts = {s.value: 0 for s in KernelStatus}
    for rec in records:
        counts[rec.status.value] += 1
    return counts


def tallies(state: ClusterState, what: str, pool: str) -> dict[str, int]:
    return {k: n for (w, p, k), n in sorted(state.tallies.items()) if w == what and p == pool}


def build_pool(pool: PoolConfig, state: ClusterState) -> dict[str, Any]:
    """One pool's model for /api/pools (pure: tested against literal dicts)."""
    infos = sorted((w for w in state.workers if pool.name in w.get("pools", ())),
                   key=lambda w: str(w.get("name", "")))
    workers = [build_worker(w, pool.name, state.now) for w in infos]
    records = [r for r in state.records if r.pool == pool.name]
    queued = state.queued.get(pool.name, [])
    positions = {kid: i + 1 for i, kid in enumerate(queued)}
    counts = status_counts(records)
    failures = tallies(state, "failures", pool.name)
    culls = tallies(state, "culls", pool.name)
    return {
        "name": pool.name, "launcher": pool.launcher, "queue": pool.queue,
        "workers": len(workers),
        "slots": sum(w["slots"] for w in workers),
        "used": sum(w["used"] for w in workers),
        "free": sum(w["free"] for w in workers if w["state"] in ("accepting", "paused")),
        "waiting": len(queued),
        "warm_ready": _sum_warm(workers),
        "warm_cost": warm_cost(workers),
        "running": counts["RUNNING"],
        "kernels_by_status": counts,
        "max_kernels": pool.max_kernels,
        "launch_timeout": pool.launch_timeout,
        "waiting_launches": [{"kernel_id": kid, "position": i + 1} for i, kid in enumerate(queued)],
        "worker_list": workers,
        "kernels": [build_kernel(r, state.now, positions.get(r.id)) for r in records
                    if r.status.live],
        "failures_total": sum(failures.values()),
        "failures_by_kind": failures,
        "culls_by_kind": culls,
        "recent_failures": [dict(f, time=iso(float(f.get("time", 0)))) for f in
                            state.failures.get(pool.name, [])],
    }


def _of_pool(by_key: Any, pool: str) -> dict[str, int]:
    """A heartbeat's "<pool>/<kernelspec>" figures for one pool, by kernelspec."""
    return {key.split("/", 1)[1]: int(n) for key, n in (by_key or {}).items()
            if key.split("/", 1)[0] == pool}


def _sum_warm(workers: list[dict[str, Any]], field: str = "warm") -> dict[str, int]:
    """Ready warm kernels (or their RSS) by kernelspec over the pool's workers."""
    out: dict[str, int] = {}
    for w in workers:
        for spec, n in w.get(field, {}).items():
            out[spec] = out.get(spec, 0) + n
    return out


def warm_cost(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """What the pool's ready warm kernels hold: a worker slot each (on ssh also a host place),
    and their resident memory as the kernels read it (None where none could say)."""
    ready, rss = _sum_warm(workers), _sum_warm(workers, "warm_rss")
    return {"slots": sum(ready.values()),
            "rss_bytes": sum(rss.values()) if rss else None,
            "kernelspecs": {spec: {"kernels": n, "slots": n, "rss_bytes": rss.get(spec)}
                            for spec, n in sorted(ready.items())}}


def build_pools(config: Config, state: ClusterState) -> list[dict[str, Any]]:
    return [build_pool(p, state) for p in config.pools.values()]


def snapshot(config: Config, registry: Registry) -> list[dict[str, Any]]:
    """Every pool's model, read now."""
    return build_pools(config, read_state(config, registry))


@bp.get("/api/pools")
def list_pools() -> Any:
    shared = state()
    return jsonify(snapshot(shared.config, shared.registry))


@bp.get("/api/pools/<name>")
def get_pool(name: str) -> Any:
    shared = state()
    config = shared.config
    if name not in config.pools:
        raise UnknownPool(f"no pool named {cut(name)!r}; pools: {', '.join(config.pools)}")
    return jsonify(build_pool(config.pools[name], read_state(config, shared.registry)))

"""Checking every kernel at once (GET /api/kernels, the reconciler): what each finds, in a
number of registry round trips that does not grow with the kernels (issue 24)."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import yaml
from flask import Flask

from poolgate.gateway.state import state
from poolgate.workers.config import PoolConfig
from poolgate.workers.protocol import KernelStatus
from poolgate.workers.reconcile import confirm_after, settle_all
from poolgate.workers.registry import KernelRecord, Registry
from tests.conftest import PrivateRedis

S = KernelStatus
POOLS = {"local": PoolConfig(name="local", launcher="local", queue="local", heartbeat_ttl=3)}


def queued(reg: Registry, kid: str, user: str = "") -> None:
    assert reg.create(KernelRecord(id=kid, name="python3", pool="local", status=S.QUEUED,
                                   user=user, worker="w@h", created=time.time(),
                                   launch_timeout=60)) == ""


def running(reg: Registry, kid: str, beating: bool, user: str = "") -> None:
    queued(reg, kid, user)
    reg.transition(kid, S.STARTING, pool="local")
    reg.transition(kid, S.RUNNING, pool="local")
    if beating:
        reg.heartbeat(kid, "w@h", 60)


def round_trips(reg: Registry) -> list[int]:
    """A counter of the connections taken from the client's pool: one per round trip (a
    command, or a pipeline's execute)."""
    pool, taken = reg.r.connection_pool, [0]
    get = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken[0] += 1
        return get(*args, **kwargs)

    pool.get_connection = counted  # type: ignore[method-assign]
    return taken


@contextlib.contextmanager
def gateway_app(tmp_path: Path, redis_port: int, **gateway: Any) -> Iterator[Flask]:
    """A gateway app (no workers) on the test's own Redis; ``gateway``: its options."""
    from poolgate.gateway.app import create_app

    cfg = tmp_path / "queues.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker_url": "memory://", "registry_url": f"redis://127.0.0.1:{redis_port}/0",
        "gateway": gateway, "pools": {"local": {"launcher": "local", "heartbeat_ttl": 3}}}))
    before = set(threading.enumerate())
    app = create_app({"CONFIG_PATH": str(cfg)})
    try:
        yield app
    finally:  # before the test's Redis goes: its threads would log their reconnections
        state(app).close()
        started = set(threading.enumerate()) - before
        for thread in started:
            thread.join(10)
        assert [t.name for t in started if t.is_alive()] == []


def test_every_kernel_is_checked_in_round_trips_that_do_not_grow_with_them(
        private_redis: PrivateRedis) -> None:
    reg = Registry(f"redis://127.0.0.1:{private_redis.port}/0")
    reg.mark_epoch()
    for n in range(300):
        running(reg, f"k{n}", beating=True)
    running(reg, "silent", beating=False)  # its worker is gone
    records = reg.all()
    taken = round_trips(reg)
    found = {rec.id: now for rec, now, _ in settle_all(reg, records, POOLS)}
    assert all(found[f"k{n}"] is not None and found[f"k{n}"].status is S.RUNNING
               for n in range(300))
    # one round trip for the heartbeats, and the missing one's own check: a first finding
    assert taken[0] <= 4, taken[0]
    assert found["silent"] is not None and found["silent"].status is S.RUNNING
    time.sleep(confirm_after(3 / 3) + 0.1)
    found = {rec.id: now for rec, now, _ in settle_all(reg, reg.all(), POOLS)}
    assert found["silent"] is not None and found["silent"].status is S.FAILED
    assert "no heartbeat" in found["silent"].reason
    assert found["k0"] is not None and found["k0"].status is S.RUNNING


def test_listing_kernels_takes_round_trips_that_do_not_grow_with_them(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    """GET /api/kernels, which JupyterLab asks every few seconds per open tab: every kernel's
    heartbeat and every queued launch's place, each read in one round trip."""
    with gateway_app(tmp_path, private_redis.port) as app:
        reg = state(app).registry
        for n in range(200):
            running(reg, f"k{n}", beating=True)
        for n in range(100):
            queued(reg, f"q{n}")
        taken = round_trips(reg)
        r = app.test_client().get("/api/kernels")
        assert r.status_code == 200 and r.json is not None
        # the records, the heartbeats, the queue places (and perhaps the gateway's heartbeat)
        assert taken[0] <= 5, taken[0]
        models = {k["id"]: k for k in r.json}
        assert len(models) == 300
        assert models["k7"]["poolgate"]["status"] == "RUNNING"
        assert models["k7"]["execution_state"] != "dead"
        assert [models[f"q{n}"]["poolgate"]["queue_position"] for n in range(100)] == \
            list(range(1, 101))  # in the order they were queued


def test_a_users_kernel_list_reads_only_their_kernels(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    """With users (here a proxy's header), each user's list reads that user's records alone:
    their live kernels and their failed ones (shown dead), never every kernel's."""
    with gateway_app(tmp_path, private_redis.port, auth={
            "kind": "header", "trusted_proxies": ["127.0.0.1"],
            "admin_users": ["root"]}) as app:
        reg = state(app).registry
        client = redis.Redis(port=private_redis.port)
        web = app.test_client()

        def listed(who: str) -> dict[str, str]:
            r = web.get("/api/kernels", headers={"X-Forwarded-User": who},
                        environ_base={"REMOTE_ADDR": "127.0.0.1"})
            assert r.status_code == 200 and r.json is not None, r.text
            return {k["id"]: k["execution_state"] for k in r.json}

        for n in range(50):
            running(reg, f"bob{n}", beating=True, user="bob")
        running(reg, "ann-live", beating=True, user="ann")
        running(reg, "ann-failed", beating=True, user="ann")
        reg.transition("ann-failed", S.FAILED, pool="local", reason="it crashed",
                       execution_state="dead")
        assert 3500 < client.ttl("pg:ended:user:ann") <= 3600  # gone with its records
        queued(reg, "ann-queued", user="ann")
        before = client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
        ann = listed("ann")
        after = client.info("commandstats")["cmdstat_hgetall"]["calls"]
        assert ann == {"ann-live": ann["ann-live"], "ann-failed": "dead",
                       "ann-queued": ann["ann-queued"]} and ann["ann-live"] != "dead"
        assert after - before == 3  # ann's three records, none of bob's fifty
        assert len(listed("bob")) == 50
        assert len(listed("root")) == 53  # an admin sees every kernel
        reg.delete("ann-live", "local")
        client.delete("pg:k:ann-failed")  # what its expiry (an hour after it failed) does
        assert listed("ann") == {"ann-queued": "starting"}
        assert client.smembers("pg:ended:user:ann") == set()  # the expired one pruned


def test_sessions_are_listed_without_walking_the_keyspace_and_go_with_their_kernels(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    """/api/sessions reads the sessions from a set of their ids and their kernels together;
    a session whose kernel is gone is deleted, as Jupyter Server deletes a culled kernel's."""
    with gateway_app(tmp_path, private_redis.port) as app:
        reg = state(app).registry
        client = redis.Redis(port=private_redis.port)
        web = app.test_client()

        def session(sid: str, kid: str) -> dict[str, str]:
            return {"id": sid, "path": f"{sid}.ipynb", "name": sid, "type": "notebook",
                    "kernel_id": kid, "user": ""}

        # one saved before the set of ids existed: a key alone, as older gateways wrote it
        running(reg, "k-old", beating=True)
        client.set("pg:s:old", json.dumps(session("old", "k-old")))
        for n in range(20):
            running(reg, f"k{n}", beating=True)
            reg.save_session(f"s{n}", session(f"s{n}", f"k{n}"))
        reg.save_session("orphan", session("orphan", "k-gone"))  # its kernel was shut down
        client.mset({f"pg:other:{n}": "x" for n in range(3000)})  # what a SCAN would walk
        r = web.get("/api/sessions")
        assert r.status_code == 200 and r.json is not None
        assert sorted(s["id"] for s in r.json) == sorted(["old", *(f"s{n}" for n in range(20))])
        assert {s["id"]: s["kernel"]["id"] for s in r.json}["s3"] == "k3"
        assert client.get("pg:s:orphan") is None  # deleted with its kernel gone
        scans = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
        taken = round_trips(reg)
        r = web.get("/api/sessions")
        assert r.status_code == 200 and len(r.json or []) == 21
        assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans
        assert taken[0] <= 8, taken[0]  # not one or more per session
        reg.delete("k3", "local")  # its kernel shut down
        assert web.get("/api/sessions/s3").status_code == 404
        assert "s3" not in {s["id"] for s in web.get("/api/sessions").json or []}
        assert client.get("pg:s:s3") is None and not client.sismember("pg:sessions", "s3")


def test_the_pools_view_and_the_kernel_list_agree_on_a_missing_heartbeat(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    """/api/pools (and /metrics, and `poolgate status`) declare a kernel dead when
    /api/kernels does: not on a heartbeat missing at one look (a paused machine expires them
    all at once), but on a second look that confirms it."""
    with gateway_app(tmp_path, private_redis.port) as app:
        reg = state(app).registry
        web = app.test_client()
        running(reg, "silent", beating=False)
        running(reg, "beating", beating=True)

        def views() -> tuple[dict[str, str], dict[str, str]]:
            pools = web.get("/api/pools/local")
            kernels = web.get("/api/kernels")
            assert pools.status_code == kernels.status_code == 200
            assert pools.json is not None and kernels.json is not None
            return ({k["id"]: k["status"] for k in pools.json["kernels"]},
                    {k["id"]: k["poolgate"]["status"] for k in kernels.json})

        assert views() == ({"silent": "RUNNING", "beating": "RUNNING"},) * 2
        time.sleep(confirm_after(3 / 3) + 0.1)
        pools, kernels = views()
        assert pools == {"beating": "RUNNING"}  # the pool's view lists live kernels only
        assert kernels == {"silent": "FAILED", "beating": "RUNNING"}
        assert "no heartbeat" in (reg.get("silent") or KernelRecord(id="")).reason

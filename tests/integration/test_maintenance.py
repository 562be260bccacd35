"""The maintenance worker (Celery beat + reconcile): the registry is put right with no gateway
and no client looking."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from poolgate.workers.protocol import KernelStatus
from poolgate.workers.reconcile import reconcile
from poolgate.workers.registry import GATEWAY_BEAT, KernelRecord, Registry
from tests.conftest import RUN_ID, PrivateRedis

POOLS = {"local": {"launcher": "local", "heartbeat_ttl": 2, "launch_timeout": 1}}


def _record(reg: Registry, kid: str, status: KernelStatus, created: float) -> None:
    rec = KernelRecord(id=kid, name="python3", pool="local", status=KernelStatus.QUEUED,
                       worker="local-1@gone", created=created, launch_timeout=1)
    assert reg.create(rec) == ""
    if status is KernelStatus.RUNNING:
        reg.transition(kid, KernelStatus.STARTING, pool="local")
        reg.transition(kid, KernelStatus.RUNNING, pool="local")
        reg.add_connection(kid, "deadgateway:session")


def test_reconcile_pass(private_redis: PrivateRedis) -> None:
    from poolgate.workers.config import PoolConfig
    from poolgate.workers.reconcile import confirm_after

    reg = Registry(f"redis://127.0.0.1:{private_redis.port}/0")
    reg.mark_epoch()  # as gateways and workers do at start: a registry without one is rebuilding
    _record(reg, "silent", KernelStatus.RUNNING, time.time())
    _record(reg, "stale-launch", KernelStatus.QUEUED, time.time() - 60)
    _record(reg, "fresh-launch", KernelStatus.QUEUED, time.time() + 60)
    _record(reg, "beating", KernelStatus.RUNNING, time.time())  # its worker is alive
    reg.heartbeat("beating", "local-1@alive", 30)
    reg.gateway_heartbeat("livegateway", 30)
    reg.add_connection("beating", "livegateway:session")
    pools = {"local": PoolConfig(name="local", launcher="local", queue="local", heartbeat_ttl=3)}
    changed = reconcile(reg, pools)
    # the first look at a missing heartbeat proves nothing yet: its writer may beat in a moment
    assert changed["failed"] == [] and changed["withdrawn"] == ["stale-launch"]
    assert changed["connections_dropped"] == 0
    time.sleep(confirm_after(GATEWAY_BEAT) + 0.1)  # the longer of the two
    reg.heartbeat("beating", "local-1@alive", 30)
    changed = reconcile(reg, pools)
    assert changed["failed"] == ["silent"] and changed["withdrawn"] == []
    assert changed["connections_dropped"] == 2  # the dead gateway's, on both running kernels
    beating = reg.get("beating")
    assert beating is not None and beating.status is KernelStatus.RUNNING
    assert reg.connections("beating").keys() == {"livegateway:session"}
    silent = reg.get("silent")
    assert silent is not None and silent.status is KernelStatus.FAILED
    assert "no heartbeat" in silent.reason and silent.connections == 0
    assert reg.get("stale-launch") is None and reg.deleted("stale-launch")
    assert reg.get("fresh-launch") is not None


def test_a_paused_machine_kills_no_kernel(private_redis: PrivateRedis) -> None:
    """A VM suspended past the heartbeat TTL: when it runs again, Redis expires every heartbeat
    at once, and a checker may look before the workers and gateways beat again. What beats
    again within a beat is alive; what does not is dead."""
    from poolgate.workers.config import PoolConfig
    from poolgate.workers.reconcile import confirm_after

    reg = Registry(f"redis://127.0.0.1:{private_redis.port}/0")
    reg.mark_epoch()
    for kid in ("resumed", "lost"):
        _record(reg, kid, KernelStatus.RUNNING, time.time())  # heartbeats expired in the pause
    reg.add_connection("resumed", "resumedgateway:session")  # its heartbeat expired too
    pools = {"local": PoolConfig(name="local", launcher="local", queue="local", heartbeat_ttl=3)}
    assert reconcile(reg, pools) == {"failed": [], "withdrawn": [], "connections_dropped": 0}
    reg.heartbeat("resumed", "local-1@resumed", 30)  # its worker beats again (and on)
    reg.gateway_heartbeat("resumedgateway")
    time.sleep(confirm_after(GATEWAY_BEAT) + 0.1)  # the longer of the two
    changed = reconcile(reg, pools)
    assert changed["failed"] == ["lost"]  # its worker never came back
    assert changed["connections_dropped"] == 2  # "deadgateway:session" on both (_record)
    resumed = reg.get("resumed")
    assert resumed is not None and resumed.status is KernelStatus.RUNNING
    assert reg.connections("resumed").keys() == {"resumedgateway:session"}


def test_maintenance_worker_reconciles_on_its_own(tmp_path: Path, private_redis: PrivateRedis) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    reg = Registry(url)
    reg.mark_epoch()  # as gateways and workers do at start: a registry without one is rebuilding
    _record(reg, "silent", KernelStatus.RUNNING, time.time())
    cfg = tmp_path / "queues.yaml"
    cfg.write_text(yaml.safe_dump({"broker_url": url, "registry_url": url, "pools": POOLS,
                                   "reconcile_interval": 2}))  # the default is 15 s
    env = dict(os.environ, POOLGATE_DATA_DIR=str(tmp_path), POOLGATE_TEST_RUN=RUN_ID)
    proc = subprocess.Popen([sys.executable, "-m", "poolgate", "maintenance", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # Two reconcile passes 2 s apart, after a start of a few seconds; at the default
        # interval (15 s) the second would come after the deadline.
        deadline = time.monotonic() + 14
        while time.monotonic() < deadline:
            rec = reg.get("silent")
            assert rec is not None
            if rec.status is KernelStatus.FAILED:
                break
            time.sleep(0.5)
        assert rec.status is KernelStatus.FAILED and "no heartbeat" in rec.reason
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

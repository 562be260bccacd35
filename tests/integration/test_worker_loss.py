"""A worker killed with SIGKILL: the gateway reports its kernels dead instead of hanging, and
the restarted worker leaves no untracked kernel process behind."""
from __future__ import annotations

import time

import psutil

from tests.conftest import Stack


def _kernel_pid(stack: Stack, kid: str) -> int:
    import json

    import redis

    handle = json.loads(redis.Redis.from_url(stack.registry_url).hget(f"pg:k:{kid}", "handle"))
    return int(handle["data"]["pid"])


def test_sigkill_worker_then_restart(fresh_stack: Stack) -> None:
    gw = fresh_stack.gw
    kid = gw.start()["id"]
    pid = _kernel_pid(fresh_stack, kid)
    assert psutil.pid_exists(pid)
    fresh_stack.kill_worker("local")
    t0 = time.monotonic()
    model = gw.wait_state(kid, "dead", timeout=20)
    assert time.monotonic() - t0 < 15
    assert "worker" in model["poolgate"]["reason"] and "heartbeat" in model["poolgate"]["reason"]
    assert psutil.pid_exists(pid)  # orphaned until its worker comes back
    ch_status = gw.get(f"/api/kernels/{kid}").status_code
    assert ch_status == 200
    fresh_stack.start_worker("local")
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the restarted worker left the orphan kernel running"
        time.sleep(0.1)
    assert gw.delete(f"/api/kernels/{kid}").status_code == 204
    assert gw.get(f"/api/kernels/{kid}").status_code == 404
    # and the pool works again
    again = gw.start()["id"]
    ch = gw.channel(again)
    assert ch.execute("1+1").result == "2"
    ch.close()
    gw.shutdown(again)

"""A worker killed with SIGKILL: the gateway reports its kernels dead instead of hanging, and
the restarted worker leaves no untracked kernel process behind."""
from __future__ import annotations

import concurrent.futures
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


def test_connected_client_sees_dead_when_the_worker_dies(fresh_stack: Stack) -> None:
    gw = fresh_stack.gw
    kid = gw.start()["id"]
    ch = gw.channel(kid)
    assert ch.execute("1").result == "1"
    fresh_stack.kill_worker("local")
    deadline = time.monotonic() + 20
    states = []
    while "dead" not in states:
        msg = ch.recv(max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] == "status":
            states.append(msg["content"]["execution_state"])
    ch.close()
    fresh_stack.start_worker("local")  # reaps the orphan
    gw.shutdown(kid)


def test_worker_back_within_ttl_adopts_its_kernels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import DB_BASE, REDIS, STACKS

    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3, ttl=12).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        kid = gw.start()["id"]
        pid = _kernel_pid(stack, kid)
        ch = gw.channel(kid)
        assert ch.execute("x = 1").status == "ok"
        stack.kill_worker("local")
        stack.start_worker("local")  # back well within the 12 s TTL
        model = gw.get(f"/api/kernels/{kid}").json()
        assert model["execution_state"] in ("idle", "busy"), model
        assert ch.execute("x + 1").result == "2"  # the same process, its state intact
        assert _kernel_pid(stack, kid) == pid
        time.sleep(13)  # past the TTL: the adopted kernel's heartbeat is kept by its new owner
        assert gw.get(f"/api/kernels/{kid}").json()["execution_state"] == "idle"
        r = gw.post(f"/api/kernels/{kid}/restart")  # control reaches the adopting worker
        assert r.status_code == 200, r.text
        ch.close()
        gw.shutdown(kid)
        assert gw.get(f"/api/kernels/{kid}").status_code == 404
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        stack.stop()
        STACKS.remove(stack)


def test_a_kernel_adopted_mid_cell_stays_busy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker that comes back while its kernel runs a silent cell takes the kernel as busy,
    as its last supervisor recorded, not idle: idle culling leaves it alone until the cell
    ends, and then sees it idle."""
    from tests.conftest import DB_BASE, REDIS, STACKS

    pools = {"local": {"launcher": "local", "queue": f"adopt{tmp_path.name[-6:]}", "slots": 2,
                       "heartbeat_ttl": 12, "cull_idle_timeout": 3, "cull_interval": 0.5}}
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3, pools=pools, specs={"tiny-py": None}).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        kid = gw.start()["id"]
        pid = _kernel_pid(stack, kid)
        ch = gw.channel(kid)
        ch.start_cell("print('running', flush=True)\nimport time; time.sleep(12)")
        ch.close()  # no client: only its being busy keeps it
        gw.wait_state(kid, "busy")
        stack.kill_worker("local")
        stack.start_worker("local")  # back well within the 12 s TTL: it adopts the kernel
        gw.holds_state(kid, "busy", 3 + 3)  # past the idle timeout, and a cull
        assert _kernel_pid(stack, kid) == pid  # adopted, not started again
        body = gw.wait_gone(kid)  # the cell ends...
        assert "culled: idle" in body["message"]  # ...and the cell's idle was seen
    finally:
        stack.stop()
        STACKS.remove(stack)


def test_a_worker_back_within_ttl_adopts_many_busy_kernels_in_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Thirty kernels each busy with a silent cell: a worker killed and started again within
    the heartbeat TTL (3 s here) adopts them all before their heartbeats are missed twice.
    Adopted one by one, each busy kernel took 0.2 s (its shell does not answer until the
    cell ends), and the last ones were declared dead while still running."""
    from tests.conftest import DB_BASE, REDIS, STACKS

    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3, slots=32, ttl=3).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        def busy_kernel(_: int) -> str:
            kid = gw.start()["id"]
            ch = gw.channel(kid)
            ch.start_cell("print('running', flush=True)\nimport time; time.sleep(600)")
            ch.close()
            return str(kid)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            kids = list(pool.map(busy_kernel, range(30)))
        pids = {kid: _kernel_pid(stack, kid) for kid in kids}
        stack.kill_worker("local")
        stack.start_worker("local")
        until = time.monotonic() + 3 + 2 + 3  # the TTL, the second look, and a margin
        while time.monotonic() < until:  # every list settles every kernel (a second look)
            dead = [k["id"] for k in gw.kernels() if k["execution_state"] == "dead"]
            assert dead == [], f"{len(dead)} of 30 busy kernels declared dead"
            time.sleep(0.5)
        assert {kid: _kernel_pid(stack, kid) for kid in kids} == pids  # adopted, not restarted
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(gw.shutdown, kids))
    finally:
        stack.stop()
        STACKS.remove(stack)

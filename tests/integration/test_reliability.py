"""Promises about failures, each proved with real processes: a Redis that restarts empty,
kernel limits under concurrent starts, idle culling and maximum lifetime."""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from tests.client import Channel
from tests.conftest import DB_BASE, STACKS, PrivateRabbit, PrivateRedis, Stack


@contextlib.contextmanager
def kernel_with_state(tmp_path: Path, private_redis: PrivateRedis
                      ) -> Iterator[tuple[Stack, str, Channel]]:
    """A stack on the test's own Redis and a kernel on it that holds ``x = 41``, with the
    channel that set it."""
    stack = Stack(tmp_path, "redis", db=0, redis_url=f"redis://127.0.0.1:{private_redis.port}").start()
    STACKS.append(stack)
    try:
        kid = stack.gw.start()["id"]
        ch = stack.gw.channel(kid)
        assert ch.execute("x = 41").status == "ok"
        yield stack, kid, ch
    finally:
        stack.stop()
        STACKS.remove(stack)


def test_redis_restart_loses_nothing(tmp_path: Path, private_redis: PrivateRedis) -> None:
    with kernel_with_state(tmp_path, private_redis) as (stack, kid, ch):
        gw = stack.gw
        # The kernel's worker is held still while Redis restarts, so that the window before its
        # supervisor writes the record again is certain to be seen, not won by a race.
        worker = stack.workers["local"].pid
        os.kill(worker, signal.SIGSTOP)
        try:
            private_redis.kill()
            private_redis.start()  # empty: it keeps nothing on disk
            r = gw.get(f"/api/kernels/{kid}")
            assert r.status_code == 503, r.text  # not yet rebuilt: "retry", never 404
            assert r.json()["reason"] == "backend_unavailable", r.text
        finally:
            os.kill(worker, signal.SIGCONT)
        codes = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = gw.get(f"/api/kernels/{kid}")
            codes.add(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert codes <= {503, 200} and r.status_code == 200, codes  # 503 while rebuilding
        assert kid in [k["id"] for k in gw.kernels()]
        assert ch.execute("x + 1", timeout=30).result == "42"  # same kernel, same state
        ch.close()
        # new launches work again once the broker is back
        other = gw.start()["id"]
        gw.shutdown(other)
        gw.shutdown(kid)
        assert gw.get(f"/api/kernels/{kid}").status_code == 404


def test_a_paused_machine_kills_no_kernel(tmp_path: Path, private_redis: PrivateRedis) -> None:
    """The gateway's and the worker's machine paused past the heartbeat TTL (a VM suspended or
    migrated): the kernel's heartbeat expired meanwhile. The gateway runs again a moment before
    the worker and looks first; the kernel must not be declared dead for that."""
    from poolgate.workers.reconcile import confirm_after

    with kernel_with_state(tmp_path, private_redis) as (stack, kid, ch):
        gw = stack.gw
        gateway, worker = stack.gateways[0].pid, stack.workers["local"].pid
        ttl = stack.pools["local"]["heartbeat_ttl"]
        os.kill(worker, signal.SIGSTOP)
        os.kill(gateway, signal.SIGSTOP)
        try:
            time.sleep(ttl + 1.5)  # the worker beats every ttl/3: its beat has expired
            os.kill(gateway, signal.SIGCONT)
            r = gw.get(f"/api/kernels/{kid}")  # a look before the worker could beat again
            assert r.status_code == 200 and r.json()["execution_state"] != "dead", r.text
        finally:
            os.kill(worker, signal.SIGCONT)
            os.kill(gateway, signal.SIGCONT)
        time.sleep(confirm_after(ttl / 3) + 0.5)
        r = gw.get(f"/api/kernels/{kid}")  # the look that would confirm it gone
        assert r.status_code == 200 and r.json()["execution_state"] != "dead", r.text
        assert ch.execute("x + 1", timeout=30).result == "42"  # same kernel, same session
        ch.close()
        gw.shutdown(kid)


def test_limits_hold_under_concurrent_starts(tmp_path: Path) -> None:
    pools = {"local": {"launcher": "local", "queue": f"lim{tmp_path.name[-6:]}", "slots": 6,
                       "heartbeat_ttl": 3, "max_kernels_per_user": 2, "max_kernels": 3}}
    stack = Stack(tmp_path, "redis", db=DB_BASE + 3, pools=pools, specs={"tiny-py": None}).start()
    STACKS.append(stack)
    try:
        gw = stack.gw

        def start(user: str) -> tuple[int, dict]:
            r = gw.post("/api/kernels", json={"env": {"KERNEL_USERNAME": user}})
            return r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(start, ["alice"] * 5 + ["bob"] * 3))
        ok = [body for code, body in results if code == 201]
        refused = [body for code, body in results if code == 403]
        assert len(ok) == 3 and len(refused) == 5, results
        per_user = {}
        for code, body in results:
            if code == 201:
                per_user[body["id"]] = code
        alice_ok = sum(1 for (code, body), u in zip(results, ["alice"] * 5 + ["bob"] * 3)
                       if code == 201 and u == "alice")
        assert alice_ok <= 2
        assert all(b["reason"] == "limit_exceeded" and "max_kernels" in b["message"] for b in refused)
        for body in ok:
            gw.shutdown(body["id"])
        assert start("alice")[0] == 201  # freed places can be taken again
        for k in gw.kernels():
            gw.shutdown(k["id"])
    finally:
        stack.stop()
        STACKS.remove(stack)


SHORT_SPEC = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": "short", "language": "python",
              "metadata": {"poolgate": {"pool": "short"}}}


def test_idle_culling_and_max_lifetime(tmp_path: Path) -> None:
    pools = {"local": {"launcher": "local", "queue": f"cull{tmp_path.name[-6:]}", "slots": 4,
                       "heartbeat_ttl": 3, "cull_idle_timeout": 3, "cull_interval": 0.5},
             "short": {"launcher": "local", "queue": f"short{tmp_path.name[-6:]}", "slots": 2,
                       "heartbeat_ttl": 3, "max_lifetime": 3}}
    stack = Stack(tmp_path, "redis", db=DB_BASE + 3, pools=pools,
                  specs={"tiny-py": None, "short-py": SHORT_SPEC}).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        connected = gw.start()["id"]
        ch_conn = gw.channel(connected)  # a client holds it: not culled (cull_connected off)
        busy = gw.start()["id"]
        ch_busy = gw.channel(busy)
        ch_busy.start_cell("print('running', flush=True)\nimport time; time.sleep(30)")
        ch_busy.close()  # busy with no client: only its being busy keeps it
        quiet_since = time.monotonic()  # neither it nor the connected one has output after this
        short = gw.start("short-py")["id"]
        ch_short = gw.channel(short)
        idle = gw.start()["id"]
        assert "culled: idle" in gw.wait_gone(idle)["message"]
        # A negative check needs the time to pass: quiet for cull_idle_timeout (3 s) plus two
        # cull_intervals and a supervisor's read, an idle kernel would be gone by now.
        time.sleep(max(0.0, quiet_since + 3 + 1 + 0.5 - time.monotonic()))
        # busy kernels are not culled, nor connected ones (listed while stopping is not enough)
        assert gw.get(f"/api/kernels/{busy}").json()["execution_state"] == "busy"
        assert gw.get(f"/api/kernels/{connected}").json()["execution_state"] == "idle"
        # connected, but...
        assert "maximum lifetime of 3s" in gw.wait_gone(short)["message"]
        for ch in (ch_conn, ch_short):
            ch.close()
        for kid in (busy, connected):
            gw.shutdown(kid)
    finally:
        stack.stop()
        STACKS.remove(stack)


def test_a_client_connecting_to_a_busy_kernel_leaves_it_busy(tmp_path: Path) -> None:
    """A second tab opened on a kernel busy with a long, silent cell: its connection asks the
    kernel for kernel_info on the control channel, which ipykernel answers at once, with a
    busy and an idle of its own on iopub, and the tab runs a cell in a subshell (JupyterLab
    does, for a widget's comm), which ends with an idle too. Neither idle is the cell's: the
    kernel stays busy in /api/kernels, and idle culling leaves it alone. (Jupyter Server
    ignores the first idle, not the second.)"""
    pools = {"local": {"launcher": "local", "queue": f"tab{tmp_path.name[-6:]}", "slots": 2,
                       "heartbeat_ttl": 3, "cull_idle_timeout": 3, "cull_interval": 0.5}}
    stack = Stack(tmp_path, "redis", db=DB_BASE + 3, pools=pools, specs={"tiny-py": None}).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        kid = gw.start()["id"]
        first = gw.channel(kid)
        first.start_cell("print('running', flush=True)\nimport time; time.sleep(20)")
        gw.wait_state(kid, "busy")
        second = gw.channel(kid)  # the gateway nudges the kernel on control (and shell)
        asked = second.send("kernel_info_request", {}, channel="control")  # as a client may
        while not ((msg := second.recv(10))["parent_header"].get("msg_id") == asked
                   and msg["msg_type"] == "kernel_info_reply"):
            pass  # answered at once, while the cell runs
        second.send("create_subshell_request", {}, channel="control")
        while (msg := second.recv(10))["msg_type"] != "create_subshell_reply":
            pass
        side = second.send("execute_request", {"code": "1 + 1", "silent": False},
                           subshell=msg["content"]["subshell_id"])
        assert second.collect(side, timeout=10).result == "2"  # its reply, and its idle
        for ch in (first, second):  # both tabs closed: only its being busy keeps it
            ch.close()
        gw.holds_state(kid, "busy", 3 + 2)  # past the idle timeout, and a cull
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        gw.wait_state(kid, "idle")  # the cell's own idle is still taken
        gw.shutdown(kid)
    finally:
        stack.stop()
        STACKS.remove(stack)


def test_rabbitmq_restart_under_load(tmp_path: Path, private_rabbit: PrivateRabbit) -> None:
    stack = Stack(tmp_path, private_rabbit.url, db=DB_BASE + 3).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        kid = gw.start()["id"]
        ch = gw.channel(kid)
        assert ch.execute("x = 1").status == "ok"
        private_rabbit.kill()
        # running kernels keep running and keep their clients: the broker is not on that path
        assert ch.execute("x + 1", timeout=30).result == "2"
        r = gw.post("/api/kernels", json={"env": {"KERNEL_LAUNCH_TIMEOUT": "5"}})
        assert r.status_code == 503, r.text  # a clear reason, not a hang or a 500
        assert r.json()["message"]
        private_rabbit.start()
        deadline = time.monotonic() + 60
        while True:  # the worker and the gateway reconnect by themselves
            r = gw.post("/api/kernels", json={"env": {"KERNEL_LAUNCH_TIMEOUT": "10"}})
            if r.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 201, r.text
        other = r.json()["id"]
        time.sleep(2)
        live = {k["id"] for k in gw.kernels() if k["execution_state"] != "dead"}
        assert live == {kid, other}  # nothing launched twice, nothing lost
        assert gw.post(f"/api/kernels/{kid}/restart").status_code == 200  # control works again
        ch.close()
        gw.shutdown(other)
        gw.shutdown(kid)
    finally:
        stack.stop()
        STACKS.remove(stack)

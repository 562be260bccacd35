"""A gateway killed with SIGKILL mid-cell: the client reconnects to another gateway and the
cell finishes there, its output complete (from the supervisor's replay buffer)."""
from __future__ import annotations

import json
import os
import signal
import time

import redis

from tests.client import Channel
from tests.conftest import Stack, free_port


def test_gateway_sigkill_mid_cell_loses_no_output(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    port = free_port()
    doomed = redis_stack.start_gateway(port)
    proc = redis_stack.gateways[-1]
    kid = gw.start()["id"]
    try:
        ch = Channel(doomed.base, kid, session="survivor")
        assert ch.execute("1").result == "1"
        mid = ch.send("execute_request", {"code": "import time\nfor i in range(12):\n"
                                          "    print(i, flush=True); time.sleep(0.25)\n'done'",
                                          "silent": False})
        got = ""
        while "2\n" not in got:
            msg = ch.recv()
            if msg["msg_type"] == "stream":
                got += msg["content"]["text"]
        os.killpg(proc.pid, signal.SIGKILL)  # the gateway dies mid-cell
        proc.wait()
        redis_stack.gateways.remove(proc)
        time.sleep(1.0)  # output keeps coming while no gateway listens
        again = Channel(gw.base, kid, session="survivor")  # the client reconnects elsewhere
        res = again.collect(mid, timeout=30)
        # Nothing lost and in order; what the dead gateway sent just before it died may come
        # again (it records what a client got every 50 ms): the README says so.
        lines = [int(x) for x in (got + res.stdout).split()]
        assert sorted(set(lines)) == list(range(12)) and lines == sorted(lines)
        repeated = {x for x in lines if lines.count(x) > 1}
        assert repeated <= {int(x) for x in got.split()}, lines
        assert res.status == "ok" and res.result == "'done'"
        assert again.execute("'next cell'").result == "'next cell'"
        again.close()
    finally:
        gw.shutdown(kid)


def test_reply_rebuilt_after_gateway_loss_keeps_the_cells_count(redis_stack: Stack) -> None:
    """The cell ends while no gateway listens, after its client had the execute_input: the
    reply rebuilt for it carries that input's execution_count (JupyterLab numbers the cell
    from the reply), not 0."""
    gw = redis_stack.gw
    doomed = redis_stack.start_gateway(free_port())
    proc = redis_stack.gateways[-1]
    kid = gw.start()["id"]
    try:
        ch = Channel(doomed.base, kid, session="counted")
        for _ in range(3):
            assert ch.execute("1").status == "ok"
        mid = ch.send("execute_request", {"code": "import time\nprint('go', flush=True)\n"
                                          "time.sleep(1.5)\n1/0", "silent": False})
        count = None
        while True:
            msg = ch.recv()
            if msg["msg_type"] == "execute_input":
                count = msg["content"]["execution_count"]
            if msg["msg_type"] == "stream":
                break
        assert count == 4
        # the dying gateway has recorded that its client got them (it does every 50 ms)
        reg, key = redis.Redis.from_url(redis_stack.registry_url), f"pg:seen:{kid}:counted"
        deadline = time.monotonic() + 10
        while json.loads(reg.get(key) or "{}").get("iopub") != msg["header"]["msg_id"]:
            assert time.monotonic() < deadline, reg.get(key)
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        redis_stack.gateways.remove(proc)
        # the cell ends while no gateway listens; the registry's execution_state is what the
        # supervisor read from iopub, so once it says idle the supervisor holds that idle
        while gw.get(f"/api/kernels/{kid}").json()["execution_state"] != "idle":
            time.sleep(0.1)
        again = Channel(gw.base, kid, session="counted")
        res = again.collect(mid, timeout=30)
        assert res.reply is not None and res.reply["status"] == "error"
        assert res.reply["execution_count"] == count and res.reply["ename"] == "ZeroDivisionError"
        again.close()
    finally:
        gw.shutdown(kid)

"""A pool without a replay buffer (``replay_buffer: 0``): its supervisors read only their
kernels' status messages, and what users see of a kernel is unchanged: the REST API shows it
busy during a cell and idle after it, last_activity moves, and the client gets all output."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DB_BASE, REDIS, RUN_ID, STACKS, Stack, need_redis


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    need_redis()
    tag = f"t{RUN_ID}so"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 2,
                       "heartbeat_ttl": 3.0, "launch_timeout": 60, "replay_buffer": 0},
             "tiny": {"launcher": "local", "queue": f"{tag}-tiny", "slots": 1,  # the test specs'
                      "heartbeat_ttl": 3.0, "launch_timeout": 60}}
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 33, pools=pools).start()
    STACKS.append(stack)
    yield stack
    stack.stop()
    STACKS.remove(stack)


def test_state_and_output_without_a_replay_buffer(stack: Stack) -> None:
    gw = stack.gw
    kid = gw.start()["id"]
    try:
        ch = gw.channel(kid)
        assert ch.execute("1 + 1", timeout=30).result == "2"
        before = gw.get(f"/api/kernels/{kid}").json()["last_activity"]
        time.sleep(1.1)  # last_activity has a resolution the cell below must pass
        mid = ch.send("execute_request", {
            "code": "import time\nfor i in range(300):\n    print(i, flush=True)\n"
                    "    time.sleep(0.01)\ntime.sleep(3)", "silent": False})
        gw.wait_state(kid, "busy", timeout=20)
        res = ch.collect(mid, timeout=60)
        assert res.status == "ok" and res.stdout == "".join(f"{i}\n" for i in range(300))
        model = gw.wait_state(kid, "idle", timeout=20)
        assert model["last_activity"] > before
        ch.close()
    finally:
        gw.shutdown(kid)

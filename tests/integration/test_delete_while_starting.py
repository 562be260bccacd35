"""A kernel deleted while it is starting ends as one the client stopped, never as "worker lost".

The supervisor moves such a kernel STARTING → STOPPING → STOPPED; a STOPPING record used to
carry no heartbeat (a kernel's heartbeat begins when it is RUNNING), so the gateway that waited
on the DELETE, reading STOPPING without one, declared it FAILED ("worker lost: no heartbeat"):
a failure in the pool's tally and a wrong reason for the client that waited on the POST."""
from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolgate.workers.registry import Registry
from tests.conftest import DB_BASE, REDIS, STACKS, Stack, need_redis

#: a kernel that takes a few seconds to come up: the DELETE lands while it is STARTING
SLOW = {"argv": ["bash", "-c", f"sleep 2; exec {sys.executable} -m ipykernel_launcher -f \"$0\"",
                 "{connection_file}"],
        "display_name": "slow to start", "language": "python"}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    need_redis()
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 19, specs={"slow-py": SLOW}).start()
    STACKS.append(stack)
    yield stack
    stack.stop()
    STACKS.remove(stack)


def test_a_kernel_deleted_while_starting_is_stopped_not_lost(stack: Stack) -> None:
    reg = Registry(stack.registry_url)
    kid = str(uuid.uuid4())
    events = reg.r.pubsub()
    events.subscribe(reg.events_prefix + kid)
    confirmed = events.get_message(timeout=5)
    assert confirmed is not None and confirmed["type"] == "subscribe"
    gw = stack.gw
    r = gw.post("/api/kernels", json={"name": "slow-py", "wait": False,
                                      "env": {"KERNEL_ID": kid}})
    assert r.status_code == 202, r.text  # accepted: the launch goes on
    deadline = time.monotonic() + 30
    while (rec := reg.get(kid)) is not None and not (rec.status.value == "STARTING"
                                                     and rec.handle):
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)  # the record is polled: the supervisor publishes no handle event
    assert gw.delete(f"/api/kernels/{kid}").status_code == 204
    seen = []
    deadline = time.monotonic() + 30
    while not seen or seen[-1].get("status") != "DELETED":
        assert time.monotonic() < deadline, seen
        msg = events.get_message(timeout=1)
        if msg and msg["type"] == "message":
            seen.append(json.loads(msg["data"]))
    assert [e for e in seen if e.get("status") == "FAILED"] == [], seen
    assert "lost" not in (reg.deleted(kid) or ""), reg.deleted(kid)
    pool = gw.get("/api/pools/local").json()
    assert kid not in [f["kernel_id"] for f in pool["recent_failures"]], pool["recent_failures"]
    assert gw.get(f"/api/kernels/{kid}").status_code == 404

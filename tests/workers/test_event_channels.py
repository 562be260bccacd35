"""Kernel events stay within their registry's database: Redis pub/sub has no databases, so two
clusters sharing one Redis server on different databases must not hear each other."""
from __future__ import annotations

import json
import time

from poolgate.workers.registry import Registry
from tests.conftest import PrivateRedis


def test_events_of_another_database_are_not_heard(private_redis: PrivateRedis) -> None:
    mine = Registry(f"redis://127.0.0.1:{private_redis.port}/1")
    theirs = Registry(f"redis://127.0.0.1:{private_redis.port}/2")
    assert mine.events_prefix != theirs.events_prefix
    ps = mine.r.pubsub()  # with the confirmation, so the test knows the subscription is live
    ps.psubscribe(mine.events_prefix + "*")
    confirmed = ps.get_message(timeout=5)
    assert confirmed is not None and confirmed["type"] == "psubscribe"
    theirs.publish("k-theirs", {"status": "RUNNING"})
    mine.publish("k-mine", {"status": "RUNNING"})
    heard = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not heard:
        msg = ps.get_message(timeout=1)
        if msg and msg["type"] == "pmessage":
            heard.append(json.loads(msg["data"])["id"])
    while (msg := ps.get_message(timeout=0.2)) is not None:  # anything else already sent
        heard.append(json.loads(msg["data"])["id"])
    assert heard == ["k-mine"]
    ps.close()

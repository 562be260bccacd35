"""The registry's list of live workers, read by every launch (issue 24)."""
from __future__ import annotations

import redis

from poolgate.workers.registry import Registry
from tests.conftest import PrivateRedis


def test_workers_are_listed_without_walking_the_keyspace_and_expired_ones_drop_out(
        private_redis: PrivateRedis) -> None:
    reg = Registry(f"redis://127.0.0.1:{private_redis.port}/0")
    client = redis.Redis(port=private_redis.port)
    client.mset({f"pg:k:{n}": "x" for n in range(5000)})  # kernels' keys: what SCAN walked
    reg.worker_heartbeat("a@h", {"name": "a@h", "pools": ["p"]}, ttl=60)
    reg.worker_heartbeat("b@h", {"name": "b@h", "pools": ["p"]}, ttl=60)
    calls = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    assert sorted(w["name"] for w in reg.workers()) == ["a@h", "b@h"]
    assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == calls
    client.delete("pg:w:b@h")  # what its TTL does when b stops beating
    assert [w["name"] for w in reg.workers()] == ["a@h"]
    assert client.smembers("pg:workers") == {b"a@h"}  # pruned
    reg.worker_heartbeat("b@h", {"name": "b@h", "pools": ["p"]}, ttl=60)  # back again
    assert sorted(w["name"] for w in reg.workers()) == ["a@h", "b@h"]
    reg.worker_gone("a@h")
    assert [w["name"] for w in reg.workers()] == ["b@h"]

"""Placement in the real registry (Redis): policies, capacity, down hosts, shared by workers."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from poolgate.workers.placement import Placement
from poolgate.workers.registry import PREFIX
from tests.conftest import DB_BASE, REDIS, need_redis


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    need_redis()
    client = redis.Redis.from_url(f"{REDIS}/{DB_BASE + 3}")
    yield client
    client.close()


@pytest.fixture
def pool(r: redis.Redis) -> Iterator[str]:
    name = f"place-{uuid.uuid4().hex[:8]}"
    yield name
    for key in r.scan_iter(f"{PREFIX}ssh:{name}:*"):
        r.delete(key)
    for key in r.scan_iter(f"{PREFIX}k:{name}-*"):
        r.delete(key)


def live(r: redis.Redis, pool: str, *kids: str) -> list[str]:
    """Kernel records in a live state, as the supervisor writes them, so prune keeps them."""
    ids = [f"{pool}-{k}" for k in kids]
    for kid in ids:
        r.hset(PREFIX + "k:" + kid, "status", "RUNNING")
    return ids


def test_round_robin_alternates_in_configured_order_across_workers(r: redis.Redis,
                                                                   pool: str) -> None:
    kids = live(r, pool, *"123456")
    hosts = [("a", 2), ("b", 2), ("c", 2)]
    one, two = Placement(r, pool, hosts), Placement(r, pool, hosts)  # two workers
    got = [(one if i % 2 else two).place(k).host for i, k in enumerate(kids)]
    assert got == ["a", "b", "c", "a", "b", "c"]
    restarted = Placement(r, pool, hosts)  # a worker that restarts keeps the order and counts
    assert restarted.counts() == {"a": 2, "b": 2, "c": 2}
    decision = restarted.place(live(r, pool, "7")[0])
    assert decision.host is None and decision.waiting
    assert decision.why() == ("a: full (2 of 2 kernels); b: full (2 of 2 kernels); "
                              "c: full (2 of 2 kernels)")
    restarted.release(kids[1])
    assert restarted.place(f"{pool}-7").host == "b"


def test_round_robin_skips_down_full_and_excluded_hosts(r: redis.Redis, pool: str) -> None:
    kids = live(r, pool, *"12345")
    p = Placement(r, pool, [("a", 1), ("b", 5), ("c", 5)])
    assert p.place(kids[0]).host == "a"
    p.mark_down("b", "connection refused", 30)
    assert p.down("b") == "connection refused"
    assert p.place(kids[1]).host == "c"
    assert p.place(kids[2]).host == "c"  # a is full, b is down
    d = p.place(kids[3], exclude=["c"])
    assert d.host is None and not d.waiting  # b is down, c was tried: fail, naming them
    assert d.why() == "a: full (1 of 1 kernels); b: down: connection refused; c: skipped"
    p.mark_up("b")
    assert p.place(kids[3]).host == "b"


def test_down_mark_expires(r: redis.Redis, pool: str) -> None:
    kid = live(r, pool, "1")[0]
    p = Placement(r, pool, [("a", 1)])
    p.mark_down("a", "timed out", 0.3)
    assert p.place(kid).host is None
    time.sleep(0.4)
    assert p.place(kid).host == "a"


def test_least_loaded_balances_by_free_share(r: redis.Redis, pool: str) -> None:
    k = live(r, pool, *"123456")
    p = Placement(r, pool, [("a", 4), ("b", 4)], "least-loaded")
    assert [p.place(x).host for x in k[:3]] == ["a", "b", "a"]
    p.release(k[0])
    p.release(k[2])
    assert p.place(k[3]).host == "a"  # a: 0 kernels, b: 1; round-robin would pick b
    uneven = Placement(r, pool + "u", [("small", 1), ("big", 4)], "least-loaded")
    assert [uneven.place(x).host for x in k[:3]] == ["small", "big", "big"]
    for x in k:
        uneven.release(x)


def test_claim_keeps_a_restart_on_its_host_and_place_is_idempotent(r: redis.Redis,
                                                                   pool: str) -> None:
    kid, other = live(r, pool, "1", "2")
    p = Placement(r, pool, [("a", 1), ("b", 1)])
    assert p.place(kid).host == "a"
    assert p.claim(kid, "a").host == "a"  # its own place does not count against it
    assert p.counts() == {"a": 1, "b": 0}
    assert p.claim(other, "a").host is None
    p.mark_down("a", "connection refused", 30)
    assert p.claim(kid, "a").host is None


def test_places_of_kernels_that_are_gone_are_pruned(r: redis.Redis, pool: str) -> None:
    kid = live(r, pool, "1")[0]
    p = Placement(r, pool, [("a", 1)])
    r.hset(PREFIX + "ssh:" + pool + ":placed", f"{pool}-dead", "a")  # a worker killed hard
    assert p.place(kid).host == "a"
    assert p.counts() == {"a": 1}


def test_concurrent_workers_never_overbook(r: redis.Redis, pool: str) -> None:
    kids = live(r, pool, *[str(i) for i in range(40)])
    hosts = [("a", 5), ("b", 5)]
    got: list[str | None] = []
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        p = Placement(redis.Redis.from_url(f"{REDIS}/{DB_BASE + 3}"), pool, hosts)
        for kid in mine:
            host = p.place(kid).host
            with lock:
                got.append(host)

    threads = [threading.Thread(target=worker, args=(kids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(h for h in got if h) == ["a"] * 5 + ["b"] * 5
    assert got.count(None) == 30


def test_a_warm_kernels_place_is_kept_while_recorded_and_moves_on_hand_over(
        r: redis.Redis, pool: str) -> None:
    p = Placement(r, pool, [("a", 1), ("b", 1)], "round-robin")
    worker = f"{pool}-worker"
    warm, gone = f"warm-{pool}-1", f"warm-{pool}-2"
    r.hset(PREFIX + "warm:" + worker, warm, "{}")  # the worker records it (workers/warm.py)
    try:
        assert p.place(warm).host == "a" and p.place(gone).host == "b"
        p.prune()  # no kernel record for either: only the recorded one keeps its place
        assert p.host_of(warm) == "a" and p.host_of(gone) is None
        kid = live(r, pool, "k1")[0]
        assert p.move(warm, kid) == "a"  # handed over: the kernel holds the place now
        assert p.host_of(kid) == "a" and p.host_of(warm) is None
        assert p.move(warm, kid) is None
    finally:
        r.delete(PREFIX + "warm:" + worker)

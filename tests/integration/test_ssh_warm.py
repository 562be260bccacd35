"""Warm kernels on an ssh pool (real sshd on 127.0.0.2 and 127.0.0.3), through the gateway.

A launch takes the warm kernel (its host and ports, its timing says so), the request's env and
working directory reach it, the set refills on a host, /api/pools shows what the warm kernels
hold; a request the warm kernel cannot serve starts cold and says why; a restart gives a fresh
process; a worker's stop leaves nothing, and its next life stops what a crash left.
"""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.client import Gateway
from tests.conftest import DB_BASE, REDIS, RUN_ID, STACKS, Stack, need_redis
from tests.integration.test_ssh_pool import ADDRESSES, KERNEL_ARGV, Hosts, where
from tests.sshd import remote_kernels

POOL, SPEC = "ssh-warm", "python3-ssh-warm"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    h = Hosts(tmp_path_factory.mktemp("ssh-warm-hosts"))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def stack(hosts: Hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway and one ssh worker whose pool keeps one warm kernel of SPEC."""
    need_redis()
    tmp = tmp_path_factory.mktemp("ssh-warm-stack")
    tag = f"t{RUN_ID}{DB_BASE + 3}"
    pool = dict(hosts.pool(f"{tag}-ssh-warm", "round-robin"), warm={SPEC: 1})
    pool["options"]["hosts"][0]["max_kernels"] = 1  # a: one place, b: two
    st = Stack(tmp, REDIS, db=DB_BASE + 3, pools={
        "local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1}, POOL: pool})
    specs = tmp / "specs"
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    (specs / SPEC).mkdir()
    (specs / SPEC / "kernel.json").write_text(json.dumps({
        "argv": KERNEL_ARGV, "display_name": SPEC, "language": "python",
        "env": {"POOLGATE_TEST_RUN": RUN_ID}, "metadata": {"poolgate": {"pool": POOL}}}))
    redis.Redis.from_url(st.registry_url).flushdb()
    st.start_worker(POOL)
    st.start_gateway(st.port)
    STACKS.append(st)
    yield st
    st.stop()
    STACKS.remove(st)


@pytest.fixture(autouse=True)
def no_kernel_but_warm_ones_left(stack: Stack, hosts: Hosts) -> Iterator[None]:
    """After every test: no client kernel lives, and the only remote kernels are the warm ones
    the worker records."""
    yield
    r = redis.Redis.from_url(stack.registry_url)
    deadline = time.monotonic() + 15
    while True:
        warm = {h["data"].get("pid") for h in warm_handles(r).values()}
        pids = {p.pid for p in remote_kernels(hosts.remote_dir)}
        if pids <= warm and not stack.live_kernels() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not stack.live_kernels()
    assert pids <= warm, f"remote kernels that are not warm ones: {pids - warm}"


def warm_handles(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """Warm kernels as the worker records them: id -> handle."""
    return {k.decode(): json.loads(v) for key in r.scan_iter("pg:warm:*")
            for k, v in r.hgetall(key).items()}


def placed(r: redis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"pg:ssh:{POOL}:placed").items()}


def wait_warm(gw: Gateway, r: redis.Redis, n: int = 1, timeout: float = 60) -> dict[str, Any]:
    """Until the pool shows ``n`` warm kernels ready (and the worker records them started)."""
    deadline = time.monotonic() + timeout
    while True:
        pool = gw.get(f"/api/pools/{POOL}").json()
        ready = {k: h for k, h in warm_handles(r).items() if h.get("connection")}
        if pool["warm_ready"].get(SPEC, 0) == n and len(ready) == n:
            return {"pool": pool, "warm": ready}
        assert time.monotonic() < deadline, f"not {n} warm kernels ready: {pool['warm_ready']}"
        time.sleep(0.1)


def endpoint(conn: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, v) for k, v in conn.items() if k != "key"))


def test_a_launch_takes_the_warm_kernel_and_the_set_refills(stack: Stack, tmp_path: Path) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    first = wait_warm(gw, r)
    (warm_id, warm), = first["warm"].items()
    assert placed(r) == {warm_id: warm["data"]["host"]}  # a warm kernel holds a host place
    cost = first["pool"]["warm_cost"]
    assert cost["slots"] == 1 and cost["kernelspecs"][SPEC]["kernels"] == 1
    assert 10 << 20 < cost["rss_bytes"] < 1 << 30, cost  # an ipykernel's RSS, as it read it

    model = gw.start(SPEC, env={"KERNEL_USERNAME": "wanda", "KERNEL_WORKING_DIR": str(tmp_path),
                                "KERNEL_EXTRA": "x"})
    kid = model["id"]
    try:
        timing = gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
        assert timing["warm"] is True and "cold_because" not in timing, timing
        conn = json.loads(r.hget(f"pg:k:{kid}", "conn") or b"{}")
        assert endpoint(conn) == endpoint(warm["connection"])  # the warm kernel, not a new one
        addr, pid = where(gw, kid)
        assert (addr, pid) == (ADDRESSES[warm["data"]["host"]], warm["data"]["pid"])
        ch = gw.channel(kid)
        res = ch.execute("import os; print(os.environ['KERNEL_ID'], os.environ['KERNEL_USERNAME'],"
                         " os.environ['KERNEL_EXTRA'], os.getcwd())")
        ch.close()
        assert res.stdout.split() == [kid, "wanda", "x", str(tmp_path)], res
        # the place moved to the kernel; the set refills with a kernel of its own
        refill = wait_warm(gw, r)
        (new_id, new), = refill["warm"].items()
        assert new_id != warm_id and placed(r) == {kid: warm["data"]["host"],
                                                   new_id: new["data"]["host"]}
    finally:
        gw.shutdown(kid)
    wait_warm(gw, r)
    assert list(placed(r)) == [new_id]


def test_a_request_the_warm_kernel_cannot_serve_starts_cold_and_says_why(stack: Stack) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    (warm_id, warm), = wait_warm(gw, r)["warm"].items()
    kid = gw.start(SPEC, env={"KERNEL_CPUS": "1"})["id"]
    try:
        timing = gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
        assert timing["warm"] is False and "resources" in timing["cold_because"], timing
        assert where(gw, kid)[1] != warm["data"]["pid"]
        assert warm_id in warm_handles(r)  # still warm, for the next request that fits
    finally:
        gw.shutdown(kid)


def test_restart_of_a_handed_over_kernel_is_a_fresh_process(stack: Stack) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    (_, warm), = wait_warm(gw, r)["warm"].items()
    kid = gw.start(SPEC, env={"KERNEL_EXTRA": "y"})["id"]
    try:
        assert where(gw, kid)[1] == warm["data"]["pid"]
        assert gw.post(f"/api/kernels/{kid}/restart").status_code == 200
        ch = gw.channel(kid)
        # started with the request's env: the process's own environment has it, not the warm id
        res = ch.execute("import os; print(os.getpid(), open('/proc/self/environ').read()"
                         ".split('\\0').count('KERNEL_ID=' + os.environ['KERNEL_ID']),"
                         " os.environ['KERNEL_ID'], os.environ['KERNEL_EXTRA'])")
        ch.close()
        pid, found, env_kid, extra = res.stdout.split()
        assert int(pid) != warm["data"]["pid"] and (found, env_kid, extra) == ("1", kid, "y")
        assert "warm" not in gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
    finally:
        gw.shutdown(kid)


def test_a_full_worker_gives_a_warm_kernels_slot_to_a_cold_launch(stack: Stack) -> None:
    """Three places (a: 1, b: 2) and three slots: two kernels and the warm one fill them; a
    third kernel of another kind of request takes the warm kernel's place."""
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    wait_warm(gw, r)
    kids = [gw.start(SPEC)["id"]]  # takes the warm kernel
    try:
        wait_warm(gw, r)
        kids.append(gw.start(SPEC, env={"KERNEL_CPUS": "1"})["id"])  # cold; the set is full
        kids.append(gw.start(SPEC, env={"KERNEL_CPUS": "1"})["id"])  # takes the warm one's slot
        timing = gw.get(f"/api/kernels/{kids[2]}").json()["poolgate"]["timing"]
        assert timing["warm"] is False, timing
        assert not warm_handles(r) and sorted(placed(r)) == sorted(kids)
        pool = gw.get(f"/api/pools/{POOL}").json()
        assert pool["warm_cost"]["slots"] == 0 and pool["used"] == 3
    finally:
        for kid in kids:
            gw.shutdown(kid)
    wait_warm(gw, r)


def test_worker_stop_leaves_nothing_and_a_crash_is_cleaned_by_its_next_life(
        stack: Stack, hosts: Hosts) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    wait_warm(gw, r)
    proc = stack.workers[POOL]
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert not remote_kernels(hosts.remote_dir) and not warm_handles(r) and not placed(r)
    assert not list(Path(hosts.remote_dir).iterdir())  # the kernels' folders went too

    stack.start_worker(POOL)
    (_, warm), = wait_warm(gw, r)["warm"].items()
    stack.kill_worker(POOL)  # SIGKILL: its warm kernel outlives it on the host
    assert [p.pid for p in remote_kernels(hosts.remote_dir)] == [warm["data"]["pid"]]
    stack.start_worker(POOL)  # its next life stops it and starts another
    (_, again), = wait_warm(gw, r)["warm"].items()
    assert again["data"]["pid"] != warm["data"]["pid"]
    assert [p.pid for p in remote_kernels(hosts.remote_dir)] == [again["data"]["pid"]]

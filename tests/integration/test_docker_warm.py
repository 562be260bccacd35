"""Warm kernels on docker and docker-swarm pools (the real engine and Swarm), through the gateway.

A launch takes the warm container or service (its address and ports; its timing says so), the
request's env and working directory reach it, the set refills, /api/pools shows their memory; a
request with other resources starts cold and says why; a worker's stop removes its warm
containers and services, and its next life removes what a crash left.
"""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.client import Gateway
from tests.conftest import RUN_ID, STACKS, PrivateRedis, Stack
from tests.integration.test_docker_pool import KERNEL_ARGV, labelled, need_engine, pool

CASES = [("docker", "py-docker"), ("swarm", "py-swarm")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private Redis, a gateway, a docker and a docker-swarm worker, one warm kernel each."""
    need_engine()
    tmp = tmp_path_factory.mktemp("docker-warm")
    server = PrivateRedis(tmp)
    server.start()
    url = f"redis://127.0.0.1:{server.port}"
    tag = f"t{RUN_ID}w"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1},
             "docker": dict(pool("docker", f"{tag}-docker"), warm={"py-docker": 1}),
             "swarm": dict(pool("docker-swarm", f"{tag}-swarm"), warm={"py-swarm": 1})}
    st = Stack(tmp, url, db=1, redis_url=url, pools=pools)
    specs = tmp / "specs"
    for target, name in CASES:
        (specs / name).mkdir()
        (specs / name / "kernel.json").write_text(json.dumps({
            "argv": KERNEL_ARGV, "display_name": name, "language": "python",
            "env": {"POOLGATE_TEST_RUN": RUN_ID}, "metadata": {"poolgate": {"pool": target}}}))
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    redis.Redis.from_url(st.registry_url).flushdb()
    try:
        st.start_worker("docker")
        st.start_worker("swarm")
        st.start_gateway(st.port)
    except BaseException:
        st.stop()
        server.kill()
        raise
    STACKS.append(st)
    yield st
    st.stop()
    STACKS.remove(st)
    server.kill()


def warm_handles(r: redis.Redis, pool_name: str = "") -> dict[str, dict[str, Any]]:
    """Warm kernels as the workers record them: id -> handle."""
    return {k.decode(): h for key in r.scan_iter("pg:warm:*")
            for k, v in r.hgetall(key).items()
            if (h := json.loads(v)) and h["pool"] == pool_name or not pool_name}


@pytest.fixture(autouse=True)
def nothing_but_warm_left(stack: Stack) -> Iterator[None]:
    """After every test: the only containers and services of this run are the warm kernels'."""
    yield
    r = redis.Redis.from_url(stack.registry_url)
    deadline = time.monotonic() + 30
    while True:
        warm = {ref for kid in warm_handles(r) for ref in labelled(kid)}
        left = set(labelled()) - warm
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"containers or services left besides the warm ones: {left}"


def wait_warm(gw: Gateway, r: redis.Redis, pool_name: str, spec: str,
              timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        model = gw.get(f"/api/pools/{pool_name}").json()
        ready = {k: h for k, h in warm_handles(r, pool_name).items() if h.get("connection")}
        if model["warm_ready"].get(spec, 0) == 1 and len(ready) == 1:
            return {"pool": model, "warm": ready}
        assert time.monotonic() < deadline, f"no warm kernel ready: {model['warm_ready']}"
        time.sleep(0.2)


def endpoint(conn: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, v) for k, v in conn.items() if k != "key"))


@pytest.mark.parametrize(("pool_name", "spec"), CASES)
def test_a_launch_takes_the_warm_kernel_and_the_set_refills(stack: Stack, pool_name: str,
                                                            spec: str) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    first = wait_warm(gw, r, pool_name, spec)
    (warm_id, warm), = first["warm"].items()
    assert labelled(warm_id)  # its container or service, labelled with the warm kernel's id
    assert 10 << 20 < first["pool"]["warm_cost"]["rss_bytes"] < 1 << 30, first["pool"]
    model = gw.start(spec, env={"KERNEL_USERNAME": "wanda", "KERNEL_WORKING_DIR": "/tmp"})
    kid = model["id"]
    try:
        timing = gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
        assert timing["warm"] is True, timing
        conn = json.loads(r.hget(f"pg:k:{kid}", "conn") or b"{}")
        assert endpoint(conn) == endpoint(warm["connection"])
        ch = gw.channel(kid)
        res = ch.execute("import os; print(os.environ['KERNEL_ID'], "
                         "os.environ['KERNEL_USERNAME'], os.getcwd())")
        ch.close()
        assert res.stdout.split() == [kid, "wanda", "/tmp"], res
        (new_id, _), = wait_warm(gw, r, pool_name, spec)["warm"].items()
        assert new_id != warm_id
    finally:
        gw.shutdown(kid)
    deadline = time.monotonic() + 30
    while labelled(warm_id):  # the handed-over kernel's resources go with it
        assert time.monotonic() < deadline, f"{warm_id}'s resources outlived its kernel"
        time.sleep(0.2)


@pytest.mark.parametrize(("pool_name", "spec"), CASES)
def test_other_resources_start_cold_and_say_why(stack: Stack, pool_name: str, spec: str) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    (warm_id, _), = wait_warm(gw, r, pool_name, spec)["warm"].items()
    kid = gw.start(spec, env={"KERNEL_CPUS": "0.5"})["id"]
    try:
        timing = gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
        assert timing["warm"] is False and "resources" in timing["cold_because"], timing
        assert warm_id in warm_handles(r) and labelled(kid)  # a resource of its own
    finally:
        gw.shutdown(kid)


def test_worker_stop_and_crash_leave_no_warm_container(stack: Stack) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    (warm_id, _), = wait_warm(gw, r, "docker", "py-docker")["warm"].items()
    proc = stack.workers["docker"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert not labelled(warm_id) and not warm_handles(r, "docker")

    stack.start_worker("docker")
    (warm_id, _), = wait_warm(gw, r, "docker", "py-docker")["warm"].items()
    stack.kill_worker("docker")  # SIGKILL: its warm container outlives it
    assert labelled(warm_id)
    stack.start_worker("docker")  # its next life removes it and starts another
    (again, _), = wait_warm(gw, r, "docker", "py-docker")["warm"].items()
    assert again != warm_id and not labelled(warm_id)

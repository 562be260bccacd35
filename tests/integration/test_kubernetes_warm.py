"""Warm kernels on a kubernetes pool, against tests/k8s_api.py (pods run as local processes).

A launch takes the warm pod (its address and ports; its timing says so) and the request's env
reaches it; the set refills; the handed-over kernel's pod and Secret go with it; a request for
other resources starts cold and says why; the worker's stop removes the warm pod.
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
from tests.conftest import RUN_ID
from tests.integration.test_kubernetes_pool import (
    KERNEL_ARGV,
    TEST_LABEL,
    K8sStack,
    fake_cluster,
    pool,
    running,
)
from tests.k8s_api import FakeKubernetes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sStack]:
    with fake_cluster(tmp_path_factory.mktemp("k8s-warm")) as (api, kubeconfig, url):
        yield from warm_stack(api, kubeconfig, url)


def warm_stack(api: FakeKubernetes, kubeconfig: Path, url: str) -> Iterator[K8sStack]:
    tmp = kubeconfig.parent
    tag = f"t{RUN_ID}kw"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1},
             "k8s": dict(pool(f"{tag}-k8s", kubeconfig, namespace="kernels"),
                         warm={"py-k8s": 1})}
    api.create("namespaces", "", {"metadata": {"name": "kernels"}})
    st = K8sStack(tmp, url, db=1, redis_url=url, pools=pools)
    st.api = api
    specs = tmp / "specs"
    (specs / "py-k8s").mkdir()
    (specs / "py-k8s" / "kernel.json").write_text(json.dumps({
        "argv": KERNEL_ARGV, "display_name": "py-k8s", "language": "python",
        "metadata": {"poolgate": {"pool": "k8s"}}}))
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    yield from running(st, ["k8s"])


def pods(api: FakeKubernetes) -> dict[str, str]:
    """This run's pods: name -> the kernel id label."""
    return {o["metadata"]["name"]: o["metadata"]["labels"]["poolgate.kernel_id"]
            for o in api.list("pods", labels=TEST_LABEL)}


def secrets(api: FakeKubernetes) -> set[str]:
    return {o["metadata"]["labels"]["poolgate.kernel_id"]
            for o in api.list("secrets", labels=TEST_LABEL)}


def warm_handles(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {k.decode(): json.loads(v) for key in r.scan_iter("pg:warm:*")
            for k, v in r.hgetall(key).items()}


@pytest.fixture(autouse=True)
def only_warm_pods_left(stack: K8sStack) -> Iterator[None]:
    yield
    r = redis.Redis.from_url(stack.registry_url)
    deadline = time.monotonic() + 20
    while set(pods(stack.api).values()) - set(warm_handles(r)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(pods(stack.api).values()) <= set(warm_handles(r)), pods(stack.api)
    assert secrets(stack.api) <= set(warm_handles(r))


def wait_warm(gw: Gateway, r: redis.Redis, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        model = gw.get("/api/pools/k8s").json()
        ready = {k: h for k, h in warm_handles(r).items() if h.get("connection")}
        if model["warm_ready"].get("py-k8s", 0) == 1 and len(ready) == 1:
            return {"pool": model, "warm": ready}
        assert time.monotonic() < deadline, f"no warm kernel ready: {model['warm_ready']}"
        time.sleep(0.1)


def test_a_launch_takes_the_warm_pod_and_its_pod_goes_with_the_kernel(stack: K8sStack) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    first = wait_warm(gw, r)
    (warm_id, warm), = first["warm"].items()
    assert list(pods(stack.api).values()) == [warm_id]
    assert first["pool"]["warm_cost"]["slots"] == 1
    kid = gw.start("py-k8s", env={"KERNEL_USERNAME": "wanda"})["id"]
    try:
        timing = gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
        assert timing["warm"] is True, timing
        conn = json.loads(r.hget(f"pg:k:{kid}", "conn") or b"{}")
        assert {k: v for k, v in conn.items() if k != "key"} == \
            {k: v for k, v in warm["connection"].items() if k != "key"}
        ch = gw.channel(kid)
        res = ch.execute("import os; print(os.environ['KERNEL_ID'], os.environ['KERNEL_USERNAME'])")
        ch.close()
        assert res.stdout.split() == [kid, "wanda"], res
        (new_id, _), = wait_warm(gw, r)["warm"].items()
        assert sorted(pods(stack.api).values()) == sorted([warm_id, new_id])
    finally:
        gw.shutdown(kid)
    deadline = time.monotonic() + 20
    while warm_id in pods(stack.api).values() or warm_id in secrets(stack.api):
        assert time.monotonic() < deadline, "the handed-over kernel's pod or Secret outlived it"
        time.sleep(0.2)


def test_other_resources_start_cold_and_worker_stop_removes_the_warm_pod(
        stack: K8sStack) -> None:
    gw, r = stack.gw, redis.Redis.from_url(stack.registry_url)
    (warm_id, _), = wait_warm(gw, r)["warm"].items()
    kid = gw.start("py-k8s", env={"KERNEL_CPUS": "0.5"})["id"]
    try:
        timing = gw.get(f"/api/kernels/{kid}").json()["poolgate"]["timing"]
        assert timing["warm"] is False and "resources" in timing["cold_because"], timing
        assert sorted(pods(stack.api).values()) == sorted([warm_id, kid])
    finally:
        gw.shutdown(kid)
    proc = stack.workers["k8s"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert not pods(stack.api) and not secrets(stack.api) and not warm_handles(r)

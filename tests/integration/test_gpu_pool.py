"""A gpu pool end to end: a real gateway and real workers on Redis, real ipykernel kernels, and
two GPUs that a labelled fake ``nvidia-smi`` on the worker's PATH reports. Kernels see only their
own GPU ids; a launch that finds both GPUs taken waits in the pool's queue, its position falling
as kernels end, and gets the GPU that was freed."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.client import Gateway
from tests.conftest import DB_BASE, RUN_ID, STACKS, Stack, need_redis
from tests.workers.launchers.test_gpu import fake_nvidia_smi

KERNEL = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
LOCAL_PROXY = "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy"
SHOW_GPUS = ("import os; print(os.environ['CUDA_VISIBLE_DEVICES'], "
             "os.environ['NVIDIA_VISIBLE_DEVICES'], os.environ.get('CUDA_DEVICE_ORDER'))")


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_redis()
    tmp = tmp_path_factory.mktemp("gpu-stack")
    db = DB_BASE + 3  # fresh_stack's DB: never in use while this module runs
    tag = f"t{RUN_ID}{db}"
    pools = {
        "local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1, "heartbeat_ttl": 3,
                  "options": {"max_memory_per_kernel": "1Gi", "max_cpus_per_kernel": 1}},
        "gpu": {"launcher": "gpu", "queue": f"{tag}-gpu", "heartbeat_ttl": 3,
                "launch_timeout": 90, "options": {"discover": "nvidia-smi"}},
    }
    specs = {"tiny-py": None,
             "gpu-py": {"argv": KERNEL, "display_name": "Python on a GPU", "language": "python",
                        "metadata": {"poolgate": {"pool": "gpu", "resources": {"gpus": 1}}}}}
    stack = Stack(tmp, "redis", db, pools=pools, specs=specs,
                  extra={"process_proxy_map": {LOCAL_PROXY: "gpu"}})
    stack.env["PATH"] = f"{fake_nvidia_smi(tmp / 'bin')}{os.pathsep}{stack.env['PATH']}"
    stack.env.pop("CUDA_VISIBLE_DEVICES", None)
    stack.start()
    STACKS.append(stack)
    yield stack
    STACKS.remove(stack)
    stack.stop()


def gpus_seen(gw: Gateway, kid: str) -> list[str]:
    """What the kernel itself sees: CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, device order."""
    ch = gw.channel(kid)
    try:
        res = ch.execute(SHOW_GPUS)
    finally:
        ch.close()
    assert res.status == "ok", res
    return res.stdout.split()


def queued(gw: Gateway) -> dict[str, int]:
    """Waiting launches of the gpu pool and their queue positions."""
    return {k["id"]: k["poolgate"]["queue_position"] for k in gw.kernels()
            if k["poolgate"]["status"] == "QUEUED"}


def wait_for(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_each_kernel_sees_only_its_own_gpu(gpu_stack: Stack) -> None:
    gw = gpu_stack.gw
    models = [gw.start("gpu-py"), gw.start("gpu-py")]
    try:
        other = Gateway(gpu_stack.url)  # an independent client sees the same assignment
        seen = {}
        for m in models:
            cuda, nvidia, order = gpus_seen(gw, m["id"])
            assert nvidia == cuda and order == "PCI_BUS_ID"
            assert m["poolgate"]["gpus"] == [cuda] and m["poolgate"]["resources"] == {"gpus": 1}
            assert other.get(f"/api/kernels/{m['id']}").json()["poolgate"]["gpus"] == [cuda]
            seen[m["id"]] = cuda
        assert sorted(seen.values()) == ["0", "1"]
    finally:
        for m in models:
            gw.shutdown(m["id"])


def test_a_waiting_launch_gets_the_freed_gpu_and_positions_fall(gpu_stack: Stack) -> None:
    gw = gpu_stack.gw
    first, second = gw.start("gpu-py"), gw.start("gpu-py")
    answers: dict[str, requests.Response] = {}

    def launch(label: str) -> None:
        answers[label] = Gateway(gpu_stack.url).post("/api/kernels", json={"name": "gpu-py"})

    threads = {}
    started: list[str] = []
    try:
        for label, n in (("third", 1), ("fourth", 2)):
            threads[label] = threading.Thread(target=launch, args=(label,))
            threads[label].start()
            wait_for(lambda: len(queued(gw)) == n, f"{n} launches waiting")
        positions = queued(gw)
        assert sorted(positions.values()) == [1, 2]
        third = next(k for k, p in positions.items() if p == 1)
        fourth = next(k for k, p in positions.items() if p == 2)

        gw.shutdown(first["id"])
        threads["third"].join(60)
        r = answers["third"]
        assert r.status_code == 201, r.text
        started.append(r.json()["id"])
        assert r.json()["id"] == third
        assert r.json()["poolgate"]["gpus"] == first["poolgate"]["gpus"]  # the GPU just freed
        assert queued(gw) == {fourth: 1}

        gw.shutdown(second["id"])
        threads["fourth"].join(60)
        r = answers["fourth"]
        assert r.status_code == 201, r.text
        started.append(r.json()["id"])
        assert r.json()["id"] == fourth and r.json()["poolgate"]["gpus"] == second["poolgate"]["gpus"]
        assert queued(gw) == {}
        assert gpus_seen(gw, fourth)[0] == second["poolgate"]["gpus"][0]
    finally:
        for kid in (first["id"], second["id"], *started):
            gw.shutdown(kid)
        for t in threads.values():
            t.join(60)
        for r in answers.values():
            if r.status_code == 201:
                gw.shutdown(r.json()["id"])


BAD_ENVS = [
    ("gpu-py", {"KERNEL_GPUS": "2"}, "max_gpus_per_kernel: 1"),
    ("gpu-py", {"KERNEL_GPUS": "two"}, "whole number of GPUs"),
    ("python3", {"KERNEL_GPUS": "1"}, "pool 'local' (launcher local) has no GPUs"),
    ("python3", {"KERNEL_MEMORY": "2Gi"}, "max_memory_per_kernel: 1Gi"),
    ("python3", {"KERNEL_CPUS": "4"}, "max_cpus_per_kernel: 1"),
    ("python3", {"KERNEL_MEMORY": "plenty"}, "expected memory like"),
]


@pytest.mark.parametrize("spec,env,message", BAD_ENVS, ids=[str(e[1]) for e in BAD_ENVS])
def test_resources_past_the_pools_limits_are_a_400(gpu_stack: Stack, spec: str,
                                                    env: dict[str, str], message: str) -> None:
    gw = gpu_stack.gw
    r = gw.post("/api/kernels", json={"name": spec, "env": env})
    assert r.status_code == 400, r.text
    assert message in r.json()["message"] and next(iter(env)) in r.json()["message"]
    assert gw.kernels() == []


def test_cpus_and_memory_of_a_local_kernel_are_enforced(gpu_stack: Stack) -> None:
    gw = gpu_stack.gw
    model = gw.start("python3", env={"KERNEL_MEMORY": "512Mi", "KERNEL_CPUS": "1"})
    try:
        assert model["poolgate"]["resources"] == {"memory": 512 * 2**20, "cpus": 1.0}
        ch = gw.channel(model["id"])
        res = ch.execute(
            "import os, resource\n"
            "cg = open('/proc/self/cgroup').read()\n"
            "held = 'poolgate-' in cg or resource.getrlimit(resource.RLIMIT_DATA)[0] == 512 * 2**20\n"
            "try:\n    b = bytearray(700 * 2**20); big = 'allocated'\n"
            "except MemoryError:\n    big = 'MemoryError'\n"
            "print(held, len(os.sched_getaffinity(0)), big)")
        ch.close()
        assert res.stdout.split() == ["True", "1", "MemoryError"], res
    finally:
        gw.shutdown(model["id"])


def test_an_unmodified_enterprise_gateway_kernelspec_routes_to_the_gpu_pool(gpu_stack: Stack) -> None:
    gw = gpu_stack.gw
    spec = gw.get("/api/kernelspecs/eg-local").json()["spec"]
    assert spec["metadata"] == {"process_proxy": {"class_name": LOCAL_PROXY}}
    model = gw.start("eg-local")
    try:
        assert model["poolgate"]["pool"] == "gpu" and len(model["poolgate"]["gpus"]) == 1
        assert gpus_seen(gw, model["id"])[0] == model["poolgate"]["gpus"][0]
        r = gw.post(f"/api/kernels/{model['id']}/restart")
        assert r.status_code == 200, r.text
        assert r.json()["poolgate"]["gpus"] == model["poolgate"]["gpus"]  # restarted on its GPU
    finally:
        gw.shutdown(model["id"])

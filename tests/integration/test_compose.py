"""docker/compose.yaml brings up a whole cluster that serves kernels to a client outside it, and
scaling a pool's workers shows in /api/pools; `down` leaves nothing behind.

Runs the compose command this machine has (Debian's docker-compose 1.29, else the v2 plugin) on
the images docker/build-images.sh builds (`all`: .ci/run does), under a project name and ports of
this test run's own. A missing piece fails the test, it does not skip it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.client import Gateway
from tests.conftest import RUN_ID, free_port

COMPOSE_FILE = Path(__file__).parents[2] / "docker" / "compose.yaml"
IMAGES = ("poolgate/poolgate:latest", "poolgate/kernel:latest")


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no compose: .ci/run installs docker-compose (Debian's Compose 1.29)")


def docker(*args: str) -> list[str]:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"docker {' '.join(args)}: {res.stderr.strip()}"
    return res.stdout.split()


class Cluster:
    """One compose project: docker/compose.yaml under a name and ports of its own."""

    def __init__(self) -> None:
        self.project = f"pgcompose{RUN_ID}"
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, "POOLGATE_PORT": str(self.port),
                    "POOLGATE_AUTH_TOKEN": self.token,
                    "POOLGATE_REDIS_PORT": str(free_port()),
                    "POOLGATE_FLOWER_PORT": str(free_port())}
        self.base = [*compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE)]
        self.gw = Gateway(f"http://127.0.0.1:{self.port}", token=self.token)
        self.kernels: list[str] = []  # ids of the kernels started, for the clean-up

    def run(self, *args: str, timeout: float = 90) -> str:
        res = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert res.returncode == 0, f"compose {' '.join(args)}: {res.stderr[-2000:]}"
        return res.stdout

    def containers(self, service: str = "") -> list[str]:
        """Short ids of the project's containers (of one service), stopped ones too."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return docker("ps", "-aq", *filters)

    def pools(self) -> dict[str, dict[str, Any]]:
        r = self.gw.get("/api/pools", timeout=30)
        assert r.status_code == 200, r.text
        return {p["name"]: p for p in r.json()}

    def wait_workers(self, want: dict[str, int], timeout: float = 60) -> dict[str, Any]:
        """Poll /api/pools until each named pool has exactly that many live workers."""
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.pools()
            except (requests.ConnectionError, requests.Timeout):  # the gateway is starting
                time.sleep(0.5)
                continue
            if all(seen.get(p, {}).get("workers") == n for p, n in want.items()):
                return seen
            time.sleep(0.5)
        logs = subprocess.run([*self.base, "logs", "--tail", "15"], env=self.env,
                              capture_output=True, text=True, timeout=30).stdout
        raise AssertionError(f"/api/pools never showed {want}: "
                             f"{ {p: v.get('worker_list') for p, v in seen.items()} }\n{logs}")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    for image in IMAGES:
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
            pytest.fail(f"image {image} is missing; run docker/build-images.sh all")
    state = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                           capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or state.stdout.strip() != "active":
        pytest.fail(f"no docker engine in a swarm ({state.stderr.strip()}); .ci/run starts both")
    c = Cluster()
    try:
        yield c
    finally:
        subprocess.run([*c.base, "down", "--remove-orphans", "-t", "5"], env=c.env,
                       capture_output=True, timeout=120)
        for kid in c.kernels:  # what a failed test left: services and containers of its kernels
            for ref in docker("service", "ls", "-q", "--filter", f"label=poolgate.kernel_id={kid}"):
                docker("service", "rm", ref)
            for ref in docker("ps", "-aq", "--filter", f"label=poolgate.kernel_id={kid}"):
                docker("rm", "-f", ref)


def test_compose_cluster_serves_kernels_scales_and_goes_away(cluster: Cluster) -> None:
    cluster.run("up", "-d")
    pools = cluster.wait_workers({"local": 1, "swarm": 1})
    [local_worker] = pools["local"]["worker_list"]
    [cid] = cluster.containers("worker-local")
    assert local_worker["name"].endswith(f"-{cid}"), local_worker  # host networking: by id

    gw = cluster.gw
    anonymous = requests.get(f"{gw.base}/api/kernels", timeout=30)  # POOLGATE_AUTH_TOKEN holds
    assert anonymous.status_code == 401, anonymous.text
    specs = ("python3", "python3-swarm")  # the local pool's and the swarm pool's, at once
    with ThreadPoolExecutor(len(specs)) as launches:
        ids = list(launches.map(lambda spec: Gateway(gw.base, token=gw.token).start(spec)["id"], specs))
    kernels = dict(zip(specs, ids))
    cluster.kernels += ids
    for spec in specs:
        ch = gw.channel(kernels[spec])
        try:
            res = ch.execute("import os; print(6 * 7, os.environ['KERNEL_ID'])")
        finally:
            ch.close()
        assert res.status == "ok", res
        assert res.stdout == f"42 {kernels[spec]}\n"
    [hosted] = cluster.pools()["local"]["kernels"]
    assert (hosted["id"], hosted["worker"]) == (kernels["python3"], local_worker["name"])
    swarm_kid = kernels["python3-swarm"]
    assert docker("service", "ls", "-q", "--filter", f"label=poolgate.kernel_id={swarm_kid}")

    cluster.run("up", "-d", "--scale", "worker-local=2")
    pools = cluster.wait_workers({"local": 2, "swarm": 1})
    names = sorted(w["name"] for w in pools["local"]["worker_list"])
    replicas = cluster.containers("worker-local")
    assert len(replicas) == 2
    assert sorted(n.rsplit("-", 1)[1] for n in names) == sorted(replicas), names
    assert all(w["state"] == "accepting" for w in pools["local"]["worker_list"])

    cluster.run("down", timeout=120)  # the swarm worker stops its kernel's service on the way
    assert cluster.containers() == []
    for kid in kernels.values():
        assert docker("service", "ls", "-q", "--filter", f"label=poolgate.kernel_id={kid}") == []
        assert docker("ps", "-aq", "--filter", f"label=poolgate.kernel_id={kid}") == []

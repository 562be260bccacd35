"""docker/compose.yaml brings up a whole cluster that serves kernels to a client outside it, and
scaling a pool's workers shows in /api/pools; `down` leaves nothing behind. Its second gateway
(profile gateway-2) drives a kernel that the first started; docker/compose.rabbitmq.yaml puts the
broker on a RabbitMQ of the cluster's own.

Runs the compose command this machine has (Debian's docker-compose 1.29, else the v2 plugin) on
the images docker/build-images.sh builds (`all`: .ci/run does), under a project name and ports of
this test run's own. A missing piece fails the test, it does not skip it.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from kombu import Connection

from tests.client import Gateway
from tests.conftest import RUN_ID, free_port

DOCKER_DIR = Path(__file__).parents[2] / "docker"
IMAGES = ("poolgate/poolgate:latest", "poolgate/kernel:latest", "poolgate/rabbitmq:latest")


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
    """One compose project: docker/compose.yaml (and override files, profiles) under a name and
    ports of its own."""

    def __init__(self, name: str, files: tuple[str, ...] = (), profiles: tuple[str, ...] = ()) -> None:
        self.project = f"pg{name}{RUN_ID}"
        self.port, self.port_2, self.rabbitmq_port = free_port(), free_port(), free_port()
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, "POOLGATE_PORT": str(self.port),
                    "POOLGATE_PORT_2": str(self.port_2),
                    "POOLGATE_AUTH_TOKEN": self.token,
                    # the cluster's containers must share the secret the kernel keys are sealed with
                    "POOLGATE_REGISTRY_SECRET": secrets.token_urlsafe(32),
                    "POOLGATE_REDIS_PORT": str(free_port()),
                    "POOLGATE_FLOWER_PORT": str(free_port()),
                    "POOLGATE_RABBITMQ_PORT": str(self.rabbitmq_port),
                    "POOLGATE_RABBITMQ_DIST_PORT": str(free_port()),
                    "POOLGATE_RABBITMQ_EPMD_PORT": str(free_port())}
        self.base = [*compose_command(), "-p", self.project]
        for f in ("compose.yaml", *files):
            self.base += ["-f", str(DOCKER_DIR / f)]
        for profile in profiles:
            self.base += ["--profile", profile]
        self.gw = Gateway(f"http://127.0.0.1:{self.port}", token=self.token)
        self.gw_2 = Gateway(f"http://127.0.0.1:{self.port_2}", token=self.token)
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

    def wait_gateway(self, gw: Gateway, path: str, timeout: float = 60) -> requests.Response:
        """GET ``path`` from ``gw`` once it listens (a gateway starting has no port yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return gw.get(path, timeout=30)
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

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
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    for image in IMAGES:
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
            pytest.fail(f"image {image} is missing; run docker/build-images.sh all")
    state = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                           capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or state.stdout.strip() != "active":
        pytest.fail(f"no docker engine in a swarm ({state.stderr.strip()}); .ci/run starts both")
    made: list[Cluster] = []

    def make(*args: Any, **kwargs: Any) -> Cluster:
        made.append(Cluster(*args, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            subprocess.run([*c.base, "down", "--remove-orphans", "-t", "5"], env=c.env,
                           capture_output=True, timeout=120)
            for kid in c.kernels:  # what a failed test left: its kernels' services, containers
                for ref in docker("service", "ls", "-q", "--filter", f"label=poolgate.kernel_id={kid}"):
                    docker("service", "rm", ref)
                for ref in docker("ps", "-aq", "--filter", f"label=poolgate.kernel_id={kid}"):
                    docker("rm", "-f", ref)


def run_cell(gw: Gateway, kid: str) -> None:
    """Run a cell in kernel ``kid`` over ``gw``'s WebSocket; it prints what only that kernel knows."""
    ch = gw.channel(kid)
    try:
        res = ch.execute("import os; print(6 * 7, os.environ['KERNEL_ID'])")
    finally:
        ch.close()
    assert res.status == "ok", res
    assert res.stdout == f"42 {kid}\n"


def test_compose_cluster_serves_kernels_scales_and_goes_away(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster("compose", profiles=("gateway-2",))
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
        run_cell(gw, kernels[spec])
    # the second gateway (its own service and port) drives the kernels the first one started
    listed = cluster.wait_gateway(cluster.gw_2, "/api/kernels")
    assert listed.status_code == 200, listed.text
    assert sorted(k["id"] for k in listed.json()) == sorted(ids)
    for spec in specs:
        run_cell(cluster.gw_2, kernels[spec])
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


def test_compose_cluster_on_rabbitmq(make_cluster: Callable[..., Cluster]) -> None:
    """With docker/compose.rabbitmq.yaml the broker is the cluster's own RabbitMQ, on ports of
    its own beside the host's RabbitMQ: the local pool's worker consumes its queue there, and a
    kernel launched through the gateway runs code."""
    cluster = make_cluster("rabbit", files=("compose.rabbitmq.yaml",))
    cluster.run("up", "-d", "gateway", "worker-local")  # with redis and rabbitmq, its dependencies
    cluster.wait_workers({"local": 1}, timeout=120)  # the worker retries until RabbitMQ is up
    with Connection(f"amqp://guest:guest@127.0.0.1:{cluster.rabbitmq_port}//",
                    connect_timeout=10) as conn:
        _, _, consumers = conn.default_channel.queue_declare("local", passive=True)
    assert consumers == 1  # the worker, through this broker

    kid = cluster.gw.start("python3")["id"]
    cluster.kernels.append(kid)
    run_cell(cluster.gw, kid)

    cluster.run("down", timeout=120)
    assert cluster.containers() == []

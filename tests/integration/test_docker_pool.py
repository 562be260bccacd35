"""docker and docker-swarm pools against the real Docker engine on this machine, through the
gateway's REST and WebSocket API.

Needs dockerd running, a Swarm initialised on it, and the kernel image that
docker/build-images.sh builds (.ci/run sees to all three). A missing piece fails the tests,
it does not skip them. Each test checks that no container or service of its kernels is left.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.client import Gateway
from tests.conftest import RUN_ID, STACKS, PrivateRedis, Stack

IMAGE = "poolgate/kernel:latest"
KERNEL_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
POOLS = ("docker", "swarm")


def docker_cli(*args: str, check: bool = True) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def need_engine() -> None:
    """Fail (never skip) when the engine, the swarm or the image is missing."""
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed; .ci/run installs docker.io")
    res = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.fail(f"no docker engine answers ({res.stderr.strip()}); .ci/run starts dockerd")
    if res.stdout.strip() != "active":
        pytest.fail("this engine is not in a swarm; .ci/run runs 'docker swarm init'")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        pytest.fail(f"image {IMAGE} is missing; run docker/build-images.sh")


def labelled(kid: str = "") -> list[str]:
    """Containers and services of this run (of one kernel, given its id)."""
    label = f"poolgate.kernel_id={kid}" if kid else f"poolgate.test_run={RUN_ID}"
    return [*docker_cli("ps", "-aq", "--filter", f"label={label}").split(),
            *docker_cli("service", "ls", "-q", "--filter", f"label={label}").split()]


def pool(launcher: str, queue: str, timeout: float = 60, **options: Any) -> dict[str, Any]:
    return {"launcher": launcher, "queue": queue, "heartbeat_ttl": 3.0, "slots": 4,
            "launch_timeout": timeout, "max_restarts": 1,
            "options": {"image": IMAGE, "labels": {"poolgate.test_run": RUN_ID},
                        "poll_interval": 1, **options}}


@pytest.fixture(scope="module")
def docker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private Redis, a gateway, and a worker each for a docker and a docker-swarm pool."""
    need_engine()
    tmp = tmp_path_factory.mktemp("docker-stack")
    server = PrivateRedis(tmp)
    server.start()
    url = f"redis://127.0.0.1:{server.port}"
    tag = f"t{RUN_ID}d"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1},
             "docker": pool("docker", f"{tag}-docker", allow_kernel_image=True,
                            allowed_images=[IMAGE]),
             "docker-host": pool("docker", f"{tag}-docker-host", network="host"),
             "swarm": pool("docker-swarm", f"{tag}-swarm")}
    stack = Stack(tmp, url, db=1, redis_url=url, pools=pools)
    specs = tmp / "specs"
    env = {"POOLGATE_TEST_RUN": RUN_ID}
    for name, target, argv, image in (
            ("py-docker", "docker", KERNEL_ARGV, None),
            ("py-swarm", "swarm", KERNEL_ARGV, None),
            ("py-docker-host", "docker-host", KERNEL_ARGV, None),
            ("broken-docker", "docker", ["python", "-c", "import sys; sys.stderr.write("
                                         "'boom: no module frobnicate\\n'); sys.exit(3)"], None),
            ("noimage-docker", "docker", KERNEL_ARGV, "poolgate/no-such-image:1"),
            ("noimage-swarm", "swarm", KERNEL_ARGV, "poolgate/no-such-image:1")):
        (specs / name).mkdir()
        resources = {"image": image} if image else {}
        (specs / name / "kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": name, "language": "python", "env": env,
            "metadata": {"poolgate": {"pool": target, "resources": resources}}}))
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    redis.Redis.from_url(stack.registry_url).flushdb()
    try:
        stack.start_worker("docker")
        stack.start_worker("docker-host")
        stack.start_worker("swarm")
        stack.start_gateway(stack.port)
    except BaseException:
        stack.stop()
        server.kill()
        raise
    STACKS.append(stack)
    yield stack
    stack.stop()
    STACKS.remove(stack)
    server.kill()


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 20
    while labelled() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = labelled()
    for ref in left:
        docker_cli("rm", "-f", ref, check=False)
        docker_cli("service", "rm", ref, check=False)
    assert not left, f"containers or services left: {left}"


def where(gw: Gateway, kid: str) -> tuple[str, str]:
    """The kernel's connection file (the kernel launcher makes a new one for each process)
    and pid, as the kernel says."""
    ch = gw.channel(kid)
    try:
        res = ch.execute("import os, ipykernel.connect as c; "
                         "print(c.get_connection_file(), os.getpid())")
        assert res.status == "ok", res
        host, pid = res.stdout.split()
        return host, pid
    finally:
        ch.close()


@pytest.mark.parametrize("name", POOLS)
def test_launch_run_stream_interrupt_restart_shutdown(docker_stack: Stack, name: str) -> None:
    gw = docker_stack.gw
    t0 = time.monotonic()
    kid = gw.start(f"py-{name}")["id"]
    launched = time.monotonic() - t0
    try:
        assert labelled(kid), "no container or service carries the kernel's label"
        ch = gw.channel(kid)
        res = ch.execute("import time\nfor i in range(3):\n    print('tick', i, flush=True)\n"
                         "    time.sleep(0.3)")
        assert res.stdout.split() == ["tick", "0", "tick", "1", "tick", "2"]
        assert len(res.out) >= 2, "output arrived in one piece, not streamed"
        assert ch.execute("import getpass; getpass.getuser()").result == "'jovyan'"
        mid = ch.start_cell()  # returns once the cell runs
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=20)
        assert res.error and res.error["ename"] == "KeyboardInterrupt"
        assert ch.execute("x = 5; x").result == "5"
        before = where(gw, kid)
        r = gw.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == kid
        assert ch.execute("'x' in dir()", timeout=30).result == "False"
        ch.close()
        assert where(gw, kid)[0] != before[0]  # a new container, the same kernel id
    finally:
        gw.shutdown(kid)
    gw.wait_state(kid, "dead", timeout=30) if gw.get(f"/api/kernels/{kid}").status_code == 200 \
        else None
    deadline = time.monotonic() + 20
    while labelled(kid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not labelled(kid)
    print(f"{name}: launched in {launched:.1f}s")


@pytest.mark.parametrize("name", POOLS)
def test_missing_image_fails_with_the_engines_reason(docker_stack: Stack, name: str) -> None:
    t0 = time.monotonic()
    r = docker_stack.gw.post("/api/kernels", json={"name": f"noimage-{name}"})
    took = time.monotonic() - t0
    assert r.status_code == 500, r.text  # a launch that failed (README, "The API")
    msg = r.json()["message"]
    assert "poolgate/no-such-image" in msg and ("No such image" in msg or "no such image" in msg
                                                 or "pull access denied" in msg), msg
    assert took < 60 + 10, f"took {took:.0f}s, past the launch timeout"
    assert docker_stack.live_kernels() == []


def test_launch_failure_names_the_kernel_output(docker_stack: Stack) -> None:
    r = docker_stack.gw.post("/api/kernels", json={"name": "broken-docker"})
    assert r.status_code == 500, r.text
    msg = r.json()["message"]
    assert "boom: no module frobnicate" in msg and "exited with status 3" in msg, msg
    assert msg.count("boom: no module frobnicate") == 1, msg
    assert docker_stack.live_kernels() == []


def test_restarted_worker_adopts_its_kernels(docker_stack: Stack) -> None:
    gw = docker_stack.gw
    kids = {name: gw.start(f"py-{name}")["id"] for name in POOLS}
    try:
        for name in POOLS:
            docker_stack.kill_worker(name)
            docker_stack.start_worker(name)
        for name, kid in kids.items():
            ch = gw.channel(kid)
            assert ch.execute("6*7").result == "42", name
            ch.close()
            assert labelled(kid)
            assert "adopted by worker" in docker_stack.log(f"worker-{name}"), name
    finally:
        for kid in kids.values():
            gw.shutdown(kid)


def test_kernel_environment_has_no_registry_or_broker_secret(docker_stack: Stack) -> None:
    gw = docker_stack.gw
    kid = gw.start("py-docker")["id"]
    try:
        ch = gw.channel(kid)
        res = ch.execute("import os; print(sorted(os.environ))")
        ch.close()
        names = res.stdout
        assert "KERNEL_ID" in names
        for secret in ("POOLGATE_RESPONSE_KEY", "POOLGATE_RESPONSE_TOKEN", "BROKER", "REDIS",
                       "REGISTRY"):
            assert secret not in names, names
    finally:
        gw.shutdown(kid)


def test_resources_no_node_has_fail_at_the_launch_timeout_with_the_engines_reason(
        docker_stack: Stack) -> None:
    t0 = time.monotonic()
    r = docker_stack.gw.post("/api/kernels", json={"name": "py-swarm", "env": {
        "KERNEL_MEMORY": "4096Gi", "KERNEL_LAUNCH_TIMEOUT": "8"}})
    took = time.monotonic() - t0
    assert r.status_code == 503, r.text  # did not start in time (README, "The API")
    msg = r.json()["message"]
    assert "insufficient resources" in msg, msg
    assert 5 < took < 8 + 2, f"took {took:.0f}s for a launch timeout of 8s"
    print(msg)
    assert docker_stack.live_kernels() == []


def test_docker_pool_on_the_host_network(docker_stack: Stack) -> None:
    gw = docker_stack.gw
    kid = gw.start("py-docker-host")["id"]
    try:
        model = gw.get(f"/api/kernels/{kid}").json()
        assert model["poolgate"]["host"] == "127.0.0.1"  # the host's ports, not a bridge IP
        ch = gw.channel(kid)
        assert ch.execute("6*7").result == "42"
        ch.close()
    finally:
        gw.shutdown(kid)


def test_kernel_image_only_from_the_pools_allow_list(docker_stack: Stack) -> None:
    gw = docker_stack.gw
    r = gw.post("/api/kernels", json={"name": "py-docker", "env": {"KERNEL_IMAGE": "evil:1"}})
    assert r.status_code == 400 and "is not an image pool 'docker' allows" in r.text, r.text
    r = gw.post("/api/kernels", json={"name": "py-swarm", "env": {"KERNEL_IMAGE": IMAGE}})
    assert r.status_code == 400 and "does not let kernels pick" in r.text, r.text
    kid = gw.start("py-docker", env={"KERNEL_IMAGE": IMAGE})["id"]
    gw.shutdown(kid)
    assert docker_stack.live_kernels() == []

"""The docker and docker-swarm builders against literal dicts; no engine."""
from __future__ import annotations

from typing import Any

import pytest

from poolgate.workers.config import build
from poolgate.workers.errors import ConfigError, LaunchRejected
from poolgate.workers.launchers import resolve
from poolgate.workers.launchers.docker_builders import (
    DockerOptions,
    SwarmOptions,
    build_container_spec,
    build_service_spec,
    resource_name,
)
from poolgate.workers.protocol import LaunchRequest

KID = "3f2a9c1e-8b7d-4e6f-a5b4-c3d2e1f0a9b8"
REPLY = {"POOLGATE_RESPONSE_ADDRESS": "172.17.0.1:40000", "POOLGATE_RESPONSE_KEY": "k",
         "POOLGATE_RESPONSE_TOKEN": "t", "POOLGATE_LAUNCH_ID": "l", "POOLGATE_KERNEL_ID": KID}
ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
LABELS = {"poolgate.managed": "true", "poolgate.kernel_id": KID, "poolgate.pool": "swarm",
          "poolgate.user": "alice", "poolgate.kernelspec": "python3-docker"}


def request(env: dict[str, str] | None = None, **resources: Any) -> LaunchRequest:
    return LaunchRequest(kernel_id=KID, pool="swarm", spec_name="python3-docker", argv=ARGV,
                         env={"KERNEL_USERNAME": "alice", **(env or {})},
                         spec_env={"SPEC": "1"}, user="alice",
                         resources={"resource_dir": "/specs/x", **resources})


def docker_options(**kw: Any) -> DockerOptions:
    return build(DockerOptions, {"image": "poolgate/kernel:latest", **kw}, "pools.d.options")


def test_container_spec_minimal() -> None:
    spec = build_container_spec(request(), docker_options(), REPLY)
    assert spec == {
        "image": "poolgate/kernel:latest",
        "command": ["python3", "-m", "poolgate.kernel_launcher", "--", "python3", "-m",
                    "ipykernel_launcher", "-f", "{connection_file}"],
        "name": f"poolgate-{KID}",
        "labels": LABELS,
        "environment": {"SPEC": "1", "KERNEL_USERNAME": "alice", "KERNEL_ID": KID, **REPLY},
        "init": True, "detach": True, "network": "bridge",
    }


def test_container_spec_everything() -> None:
    opts = docker_options(network="host", mounts=["/data:/home/jovyan/data:ro"],
                          env={"POOL": "x"}, labels={"team": "a"}, allow_kernel_uid=True,
                          cpus=0.5, memory="1Gi", allow_kernel_image=True,
                          allowed_images=["other:1"])
    req = request({"KERNEL_UID": "1234", "KERNEL_GID": "100", "KERNEL_IMAGE": "other:1"},
                  cpus=2.0, image="spec-image")
    req = LaunchRequest(**{**req.__dict__, "working_dir": "/home/jovyan/data"})
    spec = build_container_spec(req, opts, REPLY)
    assert spec == {
        "image": "other:1",
        "command": ["python3", "-m", "poolgate.kernel_launcher", "--", "python3", "-m",
                    "ipykernel_launcher", "-f", "{connection_file}"],
        "name": f"poolgate-{KID}",
        "labels": {"team": "a", **LABELS},
        "environment": {"POOL": "x", "SPEC": "1", "KERNEL_USERNAME": "alice",
                        "KERNEL_UID": "1234", "KERNEL_GID": "100", "KERNEL_ID": KID, **REPLY},
        "init": True, "detach": True, "network_mode": "host",
        "volumes": ["/data:/home/jovyan/data:ro"], "user": "1234:100",
        "working_dir": "/home/jovyan/data", "nano_cpus": 2_000_000_000,
        "mem_limit": 2**30,
    }


def test_service_spec() -> None:
    opts = build(SwarmOptions, {"image": "poolgate/kernel:latest", "memory": "512Mi",
                                "constraints": ["node.role==manager"]}, "pools.s.options")
    spec = build_service_spec(request(cpus=1.5), opts, "sha256:abc", REPLY)
    env = {"SPEC": "1", "KERNEL_USERNAME": "alice", "KERNEL_ID": KID, **REPLY}
    assert spec == {
        "image": "sha256:abc",
        "command": ["python3", "-m", "poolgate.kernel_launcher", "--", "python3", "-m",
                    "ipykernel_launcher", "-f", "{connection_file}"],
        "name": f"poolgate-{KID}",
        "labels": LABELS, "container_labels": LABELS,
        "env": [f"{k}={v}" for k, v in env.items()],
        "init": True, "networks": ["host"],
        "restart_policy": {"condition": "none"},
        "endpoint_spec": {"mode": "dnsrr"},
        "stop_grace_period": 2_000_000_000,
        "constraints": ["node.role==manager"],
        "resources": {"cpu_limit": 1_500_000_000, "mem_limit": 512 * 2**20,
                      "cpu_reservation": 1_500_000_000, "mem_reservation": 512 * 2**20},
    }


def test_image_from_the_spec_wins_over_the_pool_default() -> None:
    spec = build_container_spec(request(image="spec:2"), docker_options(), REPLY)
    assert spec["image"] == "spec:2"


@pytest.mark.parametrize("env,opts,match", [
    ({"KERNEL_IMAGE": "evil:1"}, {}, "does not let kernels pick"),
    ({"KERNEL_IMAGE": "evil:1"}, {"allow_kernel_image": True, "allowed_images": ["ok:1"]},
     "is not an image pool"),
    ({"KERNEL_UID": "0"}, {"allow_kernel_uid": True}, "does not run kernels as root"),
    ({"KERNEL_UID": "x"}, {"allow_kernel_uid": True}, "expected a number"),
])
def test_refused_requests(env: dict[str, str], opts: dict[str, Any], match: str) -> None:
    with pytest.raises(LaunchRejected, match=match):
        build_container_spec(request(env), docker_options(**opts), REPLY)


def test_uid_is_ignored_where_the_pool_does_not_allow_it() -> None:
    spec = build_container_spec(request({"KERNEL_UID": "0"}), docker_options(), REPLY)
    assert "user" not in spec


def test_no_image_anywhere() -> None:
    with pytest.raises(LaunchRejected, match="names no image"):
        build_container_spec(request(), build(DockerOptions, {}, "p"), REPLY)


def test_names() -> None:
    assert resource_name(KID) == f"poolgate-{KID}"
    odd = resource_name("Some Kernel/ID")
    assert odd.startswith("poolgate-some-kernel-id-") and len(odd) == len("poolgate-some-kernel-id-") + 8
    assert len(resource_name("x" * 100)) <= 63
    assert resource_name("a_b") != resource_name("a.b")


@pytest.mark.parametrize("data,match", [
    ({"allowed_images": ["a"]}, "set allow_kernel_image"),
    ({"allow_kernel_image": True}, "allowed_images: required"),
    ({"mounts": ["relative"]}, "mounts: expected"),
    ({"endpoint_mode": "ipvs"}, "endpoint_mode: expected one of dnsrr, vip"),
    ({"imagee": "x"}, "did you mean 'image'"),
    ({"poll_interval": 0}, "poll_interval: expected a number > 0"),
])
def test_options_validation(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(SwarmOptions, data, "pools.swarm.options")


def test_registry_resolves_both() -> None:
    assert resolve("docker").__name__ == "DockerLauncher"
    assert resolve("docker-swarm").__name__ == "SwarmLauncher"
    with pytest.raises(ConfigError, match="did you mean 'docker-swarm'"):
        resolve("docker-swarn")

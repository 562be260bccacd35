"""A worker's default name is unique per container, also where replicas share the host's name."""
from __future__ import annotations

from pathlib import Path

from poolgate.cli import container_id, default_worker_name

CID = "15e7cfa3bd73a2400436e6f1e39eb950699c498a2fa82ebfb9943977d0dcda66"
DOCKER = (  # /proc/self/mountinfo in a docker container (lines as dockerd 20.10 writes them)
    "700 650 0:52 / / rw,relatime master:300 - overlay overlay rw,lowerdir=/var/lib/docker/x\n"
    f"712 700 8:1 /var/lib/docker/containers/{CID}/resolv.conf /etc/resolv.conf rw - ext4 "
    "/dev/sda1 rw\n"
    f"713 700 8:1 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n"
    f"714 700 8:1 /var/lib/docker/containers/{CID}/hosts /etc/hosts rw - ext4 /dev/sda1 rw\n")
PODMAN = ("801 790 0:60 /containers/storage/overlay-containers/"
          f"{CID}/userdata/hostname /etc/hostname rw - tmpfs tmpfs rw\n")
HOST = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return str(path)


def test_container_id_from_docker_and_podman_mounts(tmp_path: Path) -> None:
    assert container_id(write(tmp_path, DOCKER)) == CID
    assert container_id(write(tmp_path, PODMAN)) == CID
    assert container_id(write(tmp_path, HOST)) == ""
    assert container_id(str(tmp_path / "absent")) == ""


def test_host_networking_replicas_get_the_container_id(tmp_path: Path) -> None:
    """Compose replicas with network_mode: host all have the host's name ("vm")."""
    name = default_worker_name(["local"], 1, hostname="vm", mountinfo=write(tmp_path, DOCKER))
    assert name == f"local-1@%h-{CID[:12]}"


def test_a_container_named_after_its_id_and_a_plain_host_keep_the_plain_name(
        tmp_path: Path) -> None:
    assert default_worker_name(["local"], 1, hostname=CID[:12],
                               mountinfo=write(tmp_path, DOCKER)) == "local-1@%h"
    assert default_worker_name(["gpu", "local"], 2, hostname="vm",
                               mountinfo=write(tmp_path, HOST)) == "gpu+local-2@%h"

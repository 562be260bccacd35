"""docker: a container per kernel on one Docker engine.

Reach: the kernel launcher reports the container's IP on the route to this worker. On the
default ``bridge`` network that is the container's bridge IP, which the engine's host (where the
worker and gateways run) routes to; with ``network: host`` the kernel listens on the host's own
ports. A user-defined bridge works the same way as ``bridge``. See docs/swarm.md.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from ..errors import LaunchRejected
from ..protocol import KernelHandle, LaunchRequest
from .docker_builders import KERNEL_LABEL, DockerOptions, build_container_spec
from .docker_common import EngineLauncher, docker_module, labelled
from .reply import Expectation

log = logging.getLogger(__name__)


class DockerLauncher(EngineLauncher):
    """Starts each kernel as a container; interrupts with a signal to the container."""

    Options = DockerOptions
    kind = "container"

    def response_host(self) -> str:
        if self.options.response_address:
            return self.options.response_address
        if self.options.network == "host":
            return "127.0.0.1"
        net = self.client.networks.get(self.options.network)
        for cfg in net.attrs.get("IPAM", {}).get("Config") or []:
            if cfg.get("Gateway"):
                return str(cfg["Gateway"])
            if cfg.get("Subnet") and ":" not in cfg["Subnet"]:  # the engine's convention:
                return str(next(ipaddress.ip_network(cfg["Subnet"]).hosts()))  # the first host
        raise LaunchRejected(f"pool {self.pool.name}: network {self.options.network!r} has no "
                             "gateway address; set options.response_address")

    def create(self, req: LaunchRequest, exp: Expectation) -> dict[str, Any]:
        spec = build_container_spec(req, self.options, exp.env())
        container = self.client.containers.create(**spec)
        container.start()
        return {"container": container.id, "name": spec["name"], "image": spec["image"]}

    def _container(self, handle: KernelHandle) -> Any:
        """The kernel's container: by the id in its handle, else by its label (a handle from
        before the container was made, or from another worker's launch)."""
        docker = docker_module()
        ref = str(handle.data.get("container") or "")
        if ref:
            try:
                return self.client.containers.get(ref)
            except docker.errors.NotFound:
                return None
        found = self.client.containers.list(
            all=True, filters={"label": f"{KERNEL_LABEL}={labelled(handle)}"})
        return found[0] if found else None

    def state(self, handle: KernelHandle) -> tuple[str | None, str]:
        container = self._container(handle)
        if container is None:
            return f"its container {handle.data.get('name')} is gone", ""
        st = container.attrs.get("State", {})
        if st.get("Running") or st.get("Status") in ("created", "restarting"):
            return None, str(st.get("Status", ""))
        why = f"its container exited with status {st.get('ExitCode')}"
        if st.get("OOMKilled"):
            why += " (killed: out of memory)"
        if st.get("Error"):
            why += f": {st['Error']}"
        return why, str(st.get("Status", ""))

    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        """docker kill --signal: docker-init passes it to the kernel launcher, which passes
        it to the kernel's process group."""
        docker = docker_module()
        container = self._container(handle)
        if container is None:
            return
        try:
            container.kill(signal=int(signum))
        except docker.errors.APIError as exc:
            log.warning("Kernel %s: signal %d not delivered: %s", handle.kernel_id, signum,
                        exc.explanation or exc)

    def remove_labelled(self, kernel_id: str, grace: float) -> int:
        docker = docker_module()
        found = self.client.containers.list(all=True,
                                            filters={"label": f"{KERNEL_LABEL}={kernel_id}"})
        for container in found:
            try:
                if container.status == "running" and grace > 0:
                    container.stop(timeout=max(1, int(grace)))
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if "already in progress" not in str(exc):
                    raise
        return len(found)

    def logs(self, handle: KernelHandle) -> str:
        container = self._container(handle)
        if container is None:
            return ""
        return bytes(container.logs(tail=40)).decode(errors="replace")

"""docker-swarm: a Swarm service per kernel, placed by the Swarm scheduler.

Reach: kernels are reached at their own IP, never through the routing mesh (no IPVS needed):
``endpoint_mode: dnsrr`` and ``network: host`` (the kernel listens on its node's ports and
reports the node's IP on the route to this worker), or an overlay network that the worker and
gateways are attached to (they run as containers on it). Images are referred to by ID where
the worker's engine has them, so no registry is asked for a digest. Signals go through the
kernel launcher's command port: the worker cannot reach a container on another node. See
docs/swarm.md.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ..protocol import KernelHandle, LaunchRequest
from .docker_builders import KERNEL_LABEL, SwarmOptions, build_service_spec, choose_image
from .docker_common import EngineLauncher, docker_module, labelled
from .reply import Expectation

if TYPE_CHECKING:
    from ..config import PoolConfig

log = logging.getLogger(__name__)

ENDED = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
WAITING = {"new", "allocated", "pending", "assigned", "accepted", "ready", "preparing",
           "starting"}


class SwarmLauncher(EngineLauncher):
    """Starts each kernel as a one-replica service that is never restarted by Swarm."""

    Options = SwarmOptions
    kind = "service"

    def __init__(self, pool: PoolConfig, options: SwarmOptions, runtime_dir: str) -> None:
        super().__init__(pool, options, runtime_dir)
        self.options: SwarmOptions = options

    def response_host(self) -> str:
        if self.options.response_address:
            return self.options.response_address
        if self.options.network == "host":  # this node's address in the swarm
            addr = str(self.client.info().get("Swarm", {}).get("NodeAddr") or "")
            if addr:
                return addr
        return socket.gethostbyname(socket.gethostname())

    def image_ref(self, image: str) -> str:
        """The image's ID where this engine has it (no registry is asked); else its name."""
        docker = docker_module()
        try:
            return str(self.client.images.get(image).id)
        except docker.errors.ImageNotFound:
            return image

    def create(self, req: LaunchRequest, exp: Expectation) -> dict[str, Any]:
        docker = docker_module()
        image = choose_image(req, self.options)
        spec = build_service_spec(req, self.options, self.image_ref(image), exp.env())
        types = {"resources": docker.types.Resources,
                 "restart_policy": docker.types.RestartPolicy,
                 "endpoint_spec": docker.types.EndpointSpec}
        kwargs = {k: types[k](**v) if k in types else v for k, v in spec.items()}
        service = self.client.services.create(**kwargs)
        return {"service": service.id, "name": spec["name"], "image": image}

    def _service(self, handle: KernelHandle) -> Any:
        """The kernel's service: by the id in its handle, else by its label."""
        docker = docker_module()
        ref = str(handle.data.get("service") or "")
        if ref:
            try:
                return self.client.services.get(ref)
            except docker.errors.NotFound:
                return None
        found = self.client.services.list(
            filters={"label": f"{KERNEL_LABEL}={labelled(handle)}"})
        return found[0] if found else None

    def _task(self, service: Any) -> dict[str, Any] | None:
        tasks = service.tasks()
        return max(tasks, key=lambda t: t.get("CreatedAt", "")) if tasks else None

    def state(self, handle: KernelHandle) -> tuple[str | None, str]:
        service = self._service(handle)
        if service is None:
            return f"its service {handle.data.get('name')} is gone", ""
        task = self._task(service)
        if task is None:
            return None, "no task scheduled yet"
        st = task.get("Status", {})
        state, err = str(st.get("State", "")), str(st.get("Err") or st.get("Message") or "")
        if state == "running" or state in WAITING:
            return None, f"task {state}: {err}" if err else f"task {state}"
        code = (st.get("ContainerStatus") or {}).get("ExitCode")
        why = f"its Swarm task is {state}"
        if code is not None and state in ("complete", "failed"):
            why += f" (exit status {code})"
        return f"{why}: {err}" if err else why, why

    def remove_labelled(self, kernel_id: str, grace: float) -> int:
        docker = docker_module()
        found = self.client.services.list(filters={"label": f"{KERNEL_LABEL}={kernel_id}"})
        for service in found:
            try:
                service.remove()
            except docker.errors.NotFound:
                pass
        # Swarm ends the tasks of a removed service seconds later, and reaps their containers
        # seconds after that: this engine's containers of the kernel are ended and removed here,
        # so a stop is complete when it returns (other nodes' are left to Swarm).
        label = {"label": f"{KERNEL_LABEL}={kernel_id}"}
        deadline = time.monotonic() + grace
        for c in self.client.containers.list(filters=label):
            with contextlib.suppress(docker.errors.APIError):
                c.kill(signal="SIGTERM")
        while self.client.containers.list(filters=label) and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in self.client.containers.list(all=True, filters=label):
            with contextlib.suppress(docker.errors.APIError):  # gone or being removed already
                c.remove(force=True)
        return len(found)

    def logs(self, handle: KernelHandle) -> str:
        service = self._service(handle)
        if service is None:
            return ""
        try:
            chunks = service.logs(stdout=True, stderr=True, tail=40)
            return b"".join(chunks).decode(errors="replace")
        except docker_module().errors.APIError:
            return ""

"""What the docker and docker-swarm launchers share: the engine client, the reply listener,
engine errors mapped into poolgate's, and the launch that waits for the kernel launcher.

The rule of this module: every resource a kernel gets carries the label ``poolgate.kernel_id``,
and stop() removes whatever carries it, so a half-finished launch, a redelivered one, or one
a worker that restarted since started, leaves nothing behind. Subclasses only create, inspect
and remove their own kind of resource (a container, a service).
"""
from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable, LaunchError, LaunchRejected, LaunchTimeout
from ..protocol import KernelHandle, LaunchRequest
from .base import Launcher
from .docker_builders import DockerOptions, choose_image, choose_user
from .remote import PollCache, SharedReplies, signal_through_launcher
from .reply import Expectation, ReplyListener

if TYPE_CHECKING:
    from ..config import PoolConfig

log = logging.getLogger(__name__)


def docker_module() -> Any:
    """The docker SDK, or an ImportError that names the extra to install."""
    try:
        import docker
    except ImportError as exc:
        raise ImportError("the docker and docker-swarm launchers need the docker SDK: "
                          "pip install 'poolgate[docker]'") from exc
    return docker


@contextlib.contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """Map the SDK's errors into poolgate's, with the engine's own reason."""
    docker = docker_module()
    import requests

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise LaunchRejected(f"{what}: the engine has no such image ({exc.explanation or exc})"
                             ) from exc
    except docker.errors.APIError as exc:
        raise LaunchRejected(f"{what}: the docker engine refused: "
                             f"{exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise BackendUnavailable(f"{what}: the docker engine is unreachable ({exc})") from exc


def labelled(handle: KernelHandle) -> str:
    """The kernel id its resources are labelled with: a warm kernel's own, once handed over."""
    return str(handle.data.get("labelled") or handle.kernel_id)


class EngineLauncher(Launcher):
    """A kernel per engine resource, reporting through the kernel launcher's reply."""

    Options = DockerOptions
    kind = "container"
    backend = "the engine"  # who "says" why a launch timed out

    def __init__(self, pool: PoolConfig, options: DockerOptions, runtime_dir: str) -> None:
        super().__init__(pool, options, runtime_dir)
        self.options: DockerOptions = options
        self._client: Any = None
        self._replies = SharedReplies(options.response_bind, options.response_port)
        self._lock = threading.Lock()
        self.polls = PollCache(self.options.poll_interval)
        self._explained: set[str] = set()  # launches whose error carries the kernel's output

    @classmethod
    def runs_here(cls, options: DockerOptions) -> str | None:
        try:
            docker = docker_module()
            client = docker.DockerClient(base_url=options.docker_url, timeout=5) \
                if options.docker_url else docker.from_env(timeout=5)
            client.ping()
            client.close()
        except ImportError as exc:
            return str(exc)
        except Exception as exc:
            return f"no docker engine answers ({exc})"
        return None

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                docker = docker_module()
                with self.errors(f"pool {self.pool.name}"):
                    self._client = (docker.DockerClient(base_url=self.options.docker_url,
                                                        timeout=int(self.options.api_timeout))
                                    if self.options.docker_url else
                                    docker.from_env(timeout=int(self.options.api_timeout)))
            return self._client

    @property
    def replies(self) -> ReplyListener:
        return self._replies.get()

    def prepare(self) -> None:
        self.replies  # noqa: B018 - open the listener now: a port clash shows at start-up

    def close(self) -> None:
        self._replies.close()
        if self._client is not None:
            self._client.close()

    # -- what subclasses provide -------------------------------------------------------------

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        """The context manager that maps the backend client's errors into poolgate's."""
        return engine_errors(what)

    def timeout_reason(self, handle: KernelHandle, last: str) -> str:
        """Called when a launch times out: the backend's word on why (``last`` is the latest
        that state() gave; a subclass may add the backend's events)."""
        return last

    @abc.abstractmethod
    def response_host(self) -> str:
        """Where kernel launchers reach this worker (options.response_address, or found)."""

    @abc.abstractmethod
    def create(self, req: LaunchRequest, exp: Expectation) -> dict[str, Any]:
        """Create the kernel's resource; the handle data that finds it again."""

    @abc.abstractmethod
    def state(self, handle: KernelHandle) -> tuple[str | None, str]:
        """(why the kernel's resource ended or None while it lives, the engine's latest
        word on it: a pending task's reason)."""

    @abc.abstractmethod
    def remove_labelled(self, kernel_id: str, grace: float) -> int:
        """Remove every resource labelled with ``kernel_id``; how many there were."""

    @abc.abstractmethod
    def logs(self, handle: KernelHandle) -> str:
        """The tail of the resource's output (the kernel launcher echoes the kernel's)."""

    # -- launch -----------------------------------------------------------------------------

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        deadline = time.monotonic() + req.launch_timeout  # left since queued (supervisor)
        where = f"kernel {req.kernel_id}"
        with self.errors(where):
            left = self.remove_labelled(req.kernel_id, grace=0)  # a redelivery's, a restart's
        if left:
            log.info("Kernel %s: removed %d %s(s) an earlier launch left", req.kernel_id, left,
                     self.kind)
        exp = self.replies.expect(req.kernel_id, self.response_host())
        try:
            with self.errors(where):
                data = self.create(req, exp)
            handle = KernelHandle(req.kernel_id, req.pool, host="", data=data)
            log.info("Kernel %s: %s %s created on pool %s", req.kernel_id, self.kind,
                     data.get("name"), self.pool.name)
            yield handle
            last = [""]

            def died() -> str | None:
                with self.errors(where):
                    why, last[0] = self.state(handle)
                return why

            try:
                reply = self.replies.wait(exp, deadline, died)
            except LaunchRejected as exc:
                if "--- kernel output" in exc.message:
                    self._explained.add(req.kernel_id)
                raise
            except LaunchTimeout as exc:
                with contextlib.suppress(LaunchError):
                    last[0] = self.timeout_reason(handle, last[0])
                raise LaunchTimeout(f"{exc.message}; {self.backend} says: {last[0]}"
                                    if last[0] else exc.message) from exc
            data = {**data, "pid": reply.pid, "command_port": reply.command_port}
            log.info("Kernel %s: listening at %s (%s %s)", req.kernel_id, reply.connection.ip,
                     self.kind, data.get("name"))
            yield KernelHandle(req.kernel_id, req.pool, host=reply.connection.ip,
                               connection=reply.connection, data=data)
        finally:
            self.replies.cancel(exp)


    # -- warm kernels (workers/warm.py) ---------------------------------------------------------

    def warm_fits(self, warm: KernelHandle, started_for: LaunchRequest,
                  req: LaunchRequest) -> str:
        """A warm container or service keeps the image and user it was created with: a request
        for another (KERNEL_IMAGE, KERNEL_UID/KERNEL_GID) starts cold."""
        try:
            image, user = choose_image(req, self.options), choose_user(req, self.options)
        except LaunchRejected as exc:
            return exc.message
        if image != choose_image(started_for, self.options):
            return (f"the request asks for image {image!r}; warm kernels run "
                    f"{choose_image(started_for, self.options)!r}")
        if user != choose_user(started_for, self.options):
            return (f"the request runs as {user or 'the image user'!r}; warm kernels run as "
                    f"{choose_user(started_for, self.options) or 'the image user'!r}")
        return ""

    def take_over(self, warm: KernelHandle, kernel_id: str) -> KernelHandle:
        """The resource keeps its warm kernel id label: stop() removes by ``data.labelled``."""
        handle = super().take_over(warm, kernel_id)
        handle.data["labelled"] = labelled(warm)
        return handle

    # -- supervise ----------------------------------------------------------------------------

    def poll(self, handle: KernelHandle) -> str | None:
        def ask() -> str | None:
            with self.errors(f"kernel {handle.kernel_id}"):
                return self.state(handle)[0]

        return self.polls.poll(handle.kernel_id, ask)

    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        """Through the kernel launcher's command port: works wherever the kernel's node is."""
        signal_through_launcher(handle, signum)

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        self.polls.forget(handle.kernel_id)
        with self.errors(f"kernel {handle.kernel_id}"):
            count = self.remove_labelled(labelled(handle), grace)
        log.info("Kernel %s: removed %d %s(s)", handle.kernel_id, count, self.kind)

    def failure_detail(self, handle: KernelHandle) -> str:
        if handle.kernel_id in self._explained:
            self._explained.discard(handle.kernel_id)
            return ""
        try:
            with self.errors(f"kernel {handle.kernel_id}"):
                return self.logs(handle).strip()[-2000:]
        except LaunchError:
            return ""

    def port_taken(self, handle: KernelHandle) -> bool:
        return False  # the kernel launcher picks free ports and reports a clash itself

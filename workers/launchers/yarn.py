"""yarn: each kernel is a YARN application, submitted through the ResourceManager's REST API.

The application's AM container runs the kernel launcher (poolgate/kernel_launcher.py), which
reports host, ports and key back through the one-shot sealed reply (workers/launchers/reply.py);
this module only submits the application (yarn_builders.build_yarn_app), watches its state, and
kills it. Interrupts go through the kernel launcher's command port, as docker-swarm's do: the
worker cannot signal a process on a NodeManager.

The rule of this module: every application carries the tag ``poolgate.kernel_id:<id>``, and
stop() kills whatever live application carries it, so a half-finished launch, a redelivered
one, or one a worker that restarted since submitted, leaves nothing running. An application
still ACCEPTED (waiting for room in its queue) when the launch times out is killed, and the
error carries the RM's diagnostics; one that ends before its kernel reports fails with its
final status and diagnostics.

The kernel launcher is also the application's ApplicationMaster (poolgate/yarn_am.py): it
registers over Hadoop RPC before the kernel starts, heartbeats, and unregisters when the kernel
ends, so the application is RUNNING only while a kernel lives and ends FINISHED with the
kernel's outcome. Proven against Hadoop's own RPC server (tests/yarn_am/), not yet against a
real cluster (docs/yarn.md).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable, LaunchError, LaunchRejected, LaunchTimeout
from ..protocol import KernelHandle, LaunchRequest
from .base import Launcher
from .docker_builders import resource_name
from .remote import PollCache, SharedReplies, signal_through_launcher
from .reply import ReplyListener
from .spark_builders import build_spark_submit, properties_text
from .yarn_builders import YarnOptions, build_yarn_app, kernel_tag, rm_params, submitting_user
from .yarn_client import FINAL, RMClient, rm_errors

if TYPE_CHECKING:
    from ..config import PoolConfig

log = logging.getLogger(__name__)


def describe(app: dict[str, Any] | None, app_id: str) -> tuple[str | None, str]:
    """(why the application ended, or None while it lives; the RM's latest word on it)."""
    if app is None:
        return f"its YARN application {app_id} is unknown to the ResourceManager", ""
    state, diag = str(app.get("state", "")), str(app.get("diagnostics") or "").strip()
    said = f"{state}: {diag}" if diag else state
    if state not in FINAL:
        return None, said
    final = str(app.get("finalStatus") or "UNDEFINED")
    why = f"its YARN application {app_id} ended {state} (final status {final})"
    return (f"{why}: {diag}" if diag else why), said


class YarnLauncher(Launcher):
    """Starts each kernel as a one-attempt YARN application on the pool's queue."""

    Options = YarnOptions

    def __init__(self, pool: PoolConfig, options: YarnOptions, runtime_dir: str) -> None:
        super().__init__(pool, options, runtime_dir)
        self.options: YarnOptions = options
        self.rm = RMClient(options)  # kerberos without its library: a ConfigError at start-up
        self._replies = SharedReplies(options.response_bind, options.response_port)
        self.polls = PollCache(self.options.poll_interval)

    @property
    def replies(self) -> ReplyListener:
        return self._replies.get()

    def prepare(self) -> None:
        self.replies  # noqa: B018 - open the listener now: a port clash shows at start-up

    def close(self) -> None:
        self._replies.close()
        self.rm.close()

    def response_host(self) -> str:
        """Where kernel launchers reach this worker: options.response_address, else this
        host's address on the route to the ResourceManager (NodeManagers are beside it)."""
        if self.options.response_address:
            return self.options.response_address
        from urllib.parse import urlsplit

        rm = urlsplit(self.options.rm_address)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((rm.hostname or "127.0.0.1", rm.port or 8088))
                return str(s.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())

    def params(self, handle_or_req: KernelHandle | LaunchRequest) -> dict[str, str]:
        user = handle_or_req.data.get("user", "") if isinstance(handle_or_req, KernelHandle) \
            else submitting_user(handle_or_req, self.options)
        return rm_params(self.options, str(user))

    # -- launch -------------------------------------------------------------------------------

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        deadline = time.monotonic() + req.launch_timeout  # left since queued (supervisor)
        where = f"kernel {req.kernel_id}"
        user = submitting_user(req, self.options)
        params = rm_params(self.options, user)
        with rm_errors(where):
            left = self.kill_tagged(req.kernel_id, params)  # a redelivery's, a restart's
        if left:
            log.info("Kernel %s: killed %d application(s) an earlier launch left",
                     req.kernel_id, left)
        exp = self.replies.expect(req.kernel_id, self.response_host())
        try:
            with rm_errors(where):
                if self.options.submit == "spark-submit":
                    app_id = self.spark_submit(req, exp.env(), user, params, deadline)
                else:
                    new_app = self.rm.new_application(params)
                    body = build_yarn_app(req, new_app, self.options, exp.env(), user)
                    self.rm.submit(body, params)
                    app_id = body["application-id"]
            data: dict[str, Any] = {"app_id": app_id, "name": resource_name(req.kernel_id),
                                    "user": user, "queue": self.options.queue}
            handle = KernelHandle(req.kernel_id, req.pool, host="", data=data)
            log.info("Kernel %s: application %s submitted to queue %s on pool %s",
                     req.kernel_id, app_id, self.options.queue, self.pool.name)
            yield handle
            last = [""]

            def died() -> str | None:
                try:
                    with rm_errors(where):
                        why, last[0] = describe(self.rm.app(app_id, params), app_id)
                except BackendUnavailable as exc:  # the RM, not the kernel: ask again
                    log.warning("Kernel %s: %s", req.kernel_id, exc.message)
                    return None
                return why

            try:
                reply = self.replies.wait(exp, deadline, died)
            except LaunchTimeout as exc:
                self._kill(handle, grace=0)
                raise LaunchTimeout(f"{exc.message}; killed its YARN application {app_id}, "
                                    f"which was {last[0] or 'not reported'}") from exc
            data = {**data, "pid": reply.pid, "command_port": reply.command_port}
            log.info("Kernel %s: listening at %s (application %s)", req.kernel_id,
                     reply.connection.ip, app_id)
            yield KernelHandle(req.kernel_id, req.pool, host=reply.connection.ip,
                               connection=reply.connection, data=data)
        finally:
            self.replies.cancel(exp)


    def spark_submit(self, req: LaunchRequest, reply_env: dict[str, str], user: str,
                     params: dict[str, str], deadline: float) -> str:
        """Run spark-submit in cluster mode (spark_builders.build_spark_submit) and return the
        id of the application it submitted, found by the kernel's tag."""
        import poolgate.kernel_launcher

        with tempfile.TemporaryDirectory(prefix="poolgate-spark-") as tmp:  # mode 0700
            props = os.path.join(tmp, "spark.properties")
            sub = build_spark_submit(req, self.options, reply_env, user,
                                     poolgate.kernel_launcher.__file__, props)
            with open(os.open(props, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(properties_text(sub.properties))
            try:
                done = subprocess.run(sub.argv, capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL,
                                      timeout=max(1.0, deadline - time.monotonic()))
            except FileNotFoundError:
                raise LaunchRejected(f"pool {self.pool.name!r}: spark_submit "
                                     f"{sub.argv[0]!r} is not installed on this worker") from None
            except subprocess.TimeoutExpired:
                raise LaunchTimeout(f"kernel {req.kernel_id}: spark-submit did not end "
                                    "within the launch timeout") from None
        if done.returncode:
            raise LaunchRejected(f"kernel {req.kernel_id}: spark-submit exited with status "
                                 f"{done.returncode}:\n{done.stderr[-3000:]}")
        while True:  # waitAppCompletion=false: it ended once the RM took the application
            found = self.rm.tagged(kernel_tag(req.kernel_id), params)
            if found:
                return str(found[0]["id"])
            if time.monotonic() > deadline:
                raise LaunchRejected(f"kernel {req.kernel_id}: spark-submit succeeded, and the "
                                     f"RM has no application tagged {kernel_tag(req.kernel_id)}")
            time.sleep(0.5)

    # -- supervise ------------------------------------------------------------------------------

    def poll(self, handle: KernelHandle) -> str | None:
        app_id = str(handle.data.get("app_id") or "")

        def ask() -> str | None:
            with rm_errors(f"kernel {handle.kernel_id}"):
                return describe(self.rm.app(app_id, self.params(handle)), app_id)[0]

        return self.polls.poll(handle.kernel_id, ask)

    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        """Through the kernel launcher's command port: works wherever its NodeManager is."""
        signal_through_launcher(handle, signum)

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        self.polls.forget(handle.kernel_id)
        with rm_errors(f"kernel {handle.kernel_id}"):
            count = self._kill(handle, grace)
        log.info("Kernel %s: killed %d YARN application(s)", handle.kernel_id, count)

    def _kill(self, handle: KernelHandle, grace: float) -> int:
        """Kill the handle's application and any other live one tagged with its kernel id;
        wait up to ``grace`` seconds for the RM to report them ended."""
        params = self.params(handle)
        ids = {str(handle.data["app_id"])} if handle.data.get("app_id") else set()
        ids |= {str(a["id"]) for a in self.rm.tagged(kernel_tag(handle.kernel_id), params)}
        killing = [i for i in sorted(ids) if self.rm.kill(i, params) not in ("", *FINAL)]
        deadline = time.monotonic() + max(grace, self.options.stop_grace)
        while killing and time.monotonic() < deadline:
            time.sleep(0.2)
            killing = [i for i in killing
                       if str((self.rm.app(i, params) or {}).get("state", "KILLED")) not in FINAL]
        if killing:
            log.warning("Kernel %s: application(s) %s not ended %.0fs after the kill",
                        handle.kernel_id, ", ".join(killing), grace)
        return len(ids)

    def kill_tagged(self, kernel_id: str, params: dict[str, str]) -> int:
        """Kill live applications tagged with ``kernel_id`` (an earlier launch's)."""
        found = self.rm.tagged(kernel_tag(kernel_id), params)
        for app in found:
            self.rm.kill(str(app["id"]), params)
        return len(found)

    def failure_detail(self, handle: KernelHandle) -> str:
        app_id = str(handle.data.get("app_id") or "")
        if not app_id:
            return ""
        try:
            with rm_errors(f"kernel {handle.kernel_id}"):
                app = self.rm.app(app_id, self.params(handle))
        except LaunchError:
            return ""
        return str((app or {}).get("diagnostics") or "").strip()[-2000:]

    def port_taken(self, handle: KernelHandle) -> bool:
        return False  # the kernel launcher picks free ports and reports a clash itself

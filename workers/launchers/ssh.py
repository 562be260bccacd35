"""ssh: kernels on a pool of hosts reached over SSH (paramiko), placed through the registry.

The rule of this module: a host that cannot be reached is never fatal to a launch while another
host can take the kernel. It is marked down in the registry (for ``down_for`` seconds, seen by
every worker) and the next host is tried; a kernel whose host is lost is reported gone with the
host's name, and its restart fails for the same reason, so it ends FAILED rather than moving.
Builders live in ssh_builders.py, connections in ssh_link.py.
"""
from __future__ import annotations

import collections
import getpass
import logging
import threading
import time
import uuid
from collections.abc import Generator, Iterator

from ..errors import BackendUnavailable, LaunchError, LaunchRejected, LaunchTimeout
from ..placement import Decision, Placement
from ..protocol import ConnectionInfo, KernelHandle, LaunchRequest
from .base import Launcher
from .local import wait_ready
from .local_builders import CHANNELS
from .ssh_builders import (
    SSHHost,
    SSHOptions,
    build_argv,
    build_connection_json,
    build_env,
    build_reap_script,
    build_signal_script,
    build_start_script,
    build_stop_script,
    build_tail_script,
    choose_user,
    kernel_dir,
    parse_pid,
    pick_ports,
)
from .ssh_link import HostLink, HostUnreachable, paramiko_module, probe

log = logging.getLogger(__name__)


class SSHLauncher(Launcher):
    """Starts kernels on the pool's hosts over SSH; placement state lives in the registry."""

    Options = SSHOptions

    def __init__(self, pool, options, runtime_dir):  # type: ignore[no-untyped-def]
        super().__init__(pool, options, runtime_dir)
        self.options: SSHOptions = options
        self.hosts: dict[str, SSHHost] = {h.name: h for h in options.hosts}
        self._links: dict[tuple[str, str], HostLink] = {}
        self._checked: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()
        self._placement: Placement | None = None
        self.local_user = getpass.getuser()
        # Ports handed to kernels on each host lately: a new kernel's are drawn from the others.
        self._handed: dict[str, collections.deque[int]] = collections.defaultdict(
            lambda: collections.deque(maxlen=4096))

    @classmethod
    def runs_here(cls, options: SSHOptions) -> str | None:
        try:
            paramiko_module()
        except ImportError as exc:
            return str(exc)
        return None

    @classmethod
    def default_slots(cls, options: SSHOptions) -> int | None:
        return sum(h.max_kernels for h in options.hosts)

    @property
    def placement(self) -> Placement:
        if self._placement is None:
            if self.registry is None:
                raise BackendUnavailable("the ssh launcher needs the registry (placement "
                                         "state); the worker did not attach one")
            self._placement = Placement(self.registry.r, self.pool.name,
                                        [(h.name, h.max_kernels) for h in self.options.hosts],
                                        self.options.placement)
        return self._placement

    # -- connections and host health ----------------------------------------------------------

    def _link(self, host: SSHHost, user: str) -> HostLink:
        with self._lock:
            key = (host.name, user)
            if key not in self._links:
                self._links[key] = HostLink(host, user, self.options, self.pool.name)
            return self._links[key]

    def _handle_link(self, handle: KernelHandle) -> tuple[SSHHost, HostLink] | None:
        host = self.hosts.get(str(handle.data.get("host", "")))
        if host is None:
            return None
        return host, self._link(host, str(handle.data.get("user") or self.local_user))

    def _check(self, host: SSHHost, max_age: float) -> str | None:
        """Why the host is unreachable (its sshd does not greet), probed at most every max_age."""
        now = time.monotonic()
        with self._lock:
            at, why = self._checked.get(host.name, (0.0, None))
            if now - at < max_age:
                return why
        why = probe(host, self.options.connect_timeout)
        with self._lock:
            self._checked[host.name] = (time.monotonic(), why)
        return why

    def _mark_down(self, host: SSHHost, why: str) -> None:
        log.warning("Pool %s: host %s is down (%s); out of placement for %.0fs", self.pool.name,
                    host.label, why, self.options.down_for)
        self.placement.mark_down(host.name, why, self.options.down_for)
        with self._lock:
            self._checked[host.name] = (time.monotonic(), why)

    # -- launch -----------------------------------------------------------------------------

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        deadline = time.monotonic() + req.launch_timeout
        key, ports = uuid.uuid4().hex, None
        if previous is not None and previous.connection is not None:
            key = previous.connection.key
            ports = [getattr(previous.connection, f"{c}_port") for c in CHANNELS]
        tried: dict[str, str] = {}
        started = False
        try:
            host = self._place_again(req, previous) if previous is not None else None
            while True:
                if host is None:
                    host = yield from self._place(req, tried, deadline)
                try:
                    for handle in self._start_on(host, req, key, ports, deadline):
                        started = True
                        yield handle
                    return
                except HostUnreachable as exc:
                    if started:
                        raise
                    self.placement.release(req.kernel_id)
                    self._mark_down(host, exc.message.split(": ", 1)[-1])
                    self._reap(host, req)
                    tried[host.name] = exc.message
                    if previous is not None:  # a restart in place: the host is the kernel's
                        raise LaunchRejected(f"kernel {req.kernel_id} lost its host: "
                                             f"{exc.message}") from exc
                    host, ports = None, None
        except Exception:
            if not started:  # nothing reached the supervisor, so no stop() will release it
                self.placement.release(req.kernel_id)
            raise

    def _reap(self, host: SSHHost, req: LaunchRequest) -> None:
        """A start whose command failed may still have started the kernel: kill it if we can."""
        if probe(host, self.options.connect_timeout) is not None:
            return
        user, _ = choose_user(req.env.get("KERNEL_USERNAME", ""), host, self.options,
                              self.local_user)
        try:
            self._link(host, user).run(build_reap_script(kernel_dir(self.options, req.kernel_id)),
                                       timeout=5)
        except HostUnreachable as exc:
            log.error("Kernel %s: a start on %s may have left a kernel in %s (%s): an operator "
                      "should check", req.kernel_id, host.label,
                      kernel_dir(self.options, req.kernel_id), exc.message)

    def _place_again(self, req: LaunchRequest, previous: KernelHandle) -> SSHHost | None:
        """A restart goes back to the kernel's host, unless it is down (then it fails)."""
        name = str(previous.data.get("host", ""))
        host = self.hosts.get(name)
        if host is None:
            raise LaunchRejected(f"cannot restart kernel {req.kernel_id}: host {name!r} is no "
                                 f"longer in pool {self.pool.name}")
        decision = self.placement.claim(req.kernel_id, name)
        if decision.host:
            return host
        why = self.placement.down(name)
        if why:
            raise LaunchRejected(f"cannot restart kernel {req.kernel_id} on host {host.label}: "
                                 f"it is down ({why})")
        log.info("Kernel %s: host %s filled up during the restart; placing it again",
                 req.kernel_id, host.name)
        return None

    def _place(self, req: LaunchRequest, tried: dict[str, str],
               deadline: float) -> Generator[KernelHandle, None, SSHHost]:
        """The next host by the pool's policy; waits while every usable host is full,
        yielding a handle now and then so that a withdrawn launch reaches the supervisor."""
        while True:
            decision = self.placement.place(req.kernel_id, exclude=tried)
            if decision.host is not None:
                host = self.hosts[decision.host]
                why = self._check(host, max_age=0)  # a stopped sshd must not get this kernel
                if why is None:
                    log.info("Kernel %s placed on host %s of pool %s (%s)", req.kernel_id,
                             host.label, self.pool.name, self.options.placement)
                    return host
                self.placement.release(req.kernel_id)
                self._mark_down(host, why)
                tried[host.name] = f"host {host.label}: {why}"
                continue
            if not decision.waiting or time.monotonic() >= deadline:
                raise self._no_host(req, decision, tried)
            yield KernelHandle(req.kernel_id, req.pool, data={"waiting_for_host": True})
            time.sleep(0.5)

    def _no_host(self, req: LaunchRequest, decision: Decision,
                 tried: dict[str, str]) -> LaunchError:
        parts = [tried.get(h.name) or h.describe() for h in decision.hosts]
        cls = LaunchTimeout if decision.waiting else BackendUnavailable
        return cls(f"no host of pool {self.pool.name} could take kernel {req.kernel_id}: "
                   + "; ".join(parts))

    def _start_on(self, host: SSHHost, req: LaunchRequest, key: str, ports: list[int] | None,
                  deadline: float) -> Iterator[KernelHandle]:
        """Start on ``host``, yielding the handle once started and again once it answers;
        on fresh ports if a port was taken."""
        user, note = choose_user(req.env.get("KERNEL_USERNAME", ""), host, self.options,
                                 self.local_user)
        if note:
            log.info("Kernel %s: %s", req.kernel_id, note)
        link = self._link(host, user)
        for attempt in (1, 2, 3):
            with self._lock:  # launches run in threads of their own
                handed = self._handed[host.name]
                use = ports or pick_ports(self.options.ports, avoid=set(handed))
                handed.extend(use)
            handle = self._start(link, req, key, use, user)
            yield handle
            try:
                self._wait_ready(link, handle, deadline)
                yield handle  # the last handle: its kernel answers requests
                return
            except LaunchRejected:
                if attempt == 3 or not self.port_taken(handle):
                    raise
                log.info("Kernel %s: a port was taken on %s; starting again on fresh ports",
                         req.kernel_id, host.name)
                self._kill(handle, grace=0)
                ports = None
        raise AssertionError("unreachable")

    def _start(self, link: HostLink, req: LaunchRequest, key: str, ports: list[int],
               user: str) -> KernelHandle:
        host, folder = link.host, kernel_dir(self.options, req.kernel_id)
        cfile = f"{folder}/connection.json"
        script = build_start_script(build_argv(req.argv, self.options, cfile), build_env(req),
                                    folder, build_connection_json(host, key, ports,
                                                                  self.options.transport),
                                    req.working_dir)
        res = link.run(script)
        pid = parse_pid(res.out)
        if res.rc != 0 or pid is None:
            raise LaunchRejected(f"host {host.label}: could not start the kernel "
                                 f"(exit {res.rc}): {res.err.strip()[-500:]}")
        conn = ConnectionInfo.from_dict({
            "ip": host.listen_ip, "key": key, "transport": self.options.transport,
            **{f"{c}_port": p for c, p in zip(CHANNELS, ports)}})
        log.info("Kernel %s: started on %s as %s, pid %d", req.kernel_id, host.label, user, pid)
        return KernelHandle(req.kernel_id, req.pool, host=host.name, connection=conn,
                            data={"host": host.name, "address": host.address, "user": user,
                                  "pid": pid, "dir": folder})

    def _wait_ready(self, link: HostLink, handle: KernelHandle, deadline: float) -> None:
        assert handle.connection is not None
        checked, died = [0.0], [""]

        def alive() -> bool:  # SSH round trips: at most every half second
            if time.monotonic() - checked[0] >= 0.5:
                # A kernel that could not bind a port does not exit (ipykernel 7): its log says.
                died[0] = self.poll(handle) or (
                    "one of its ports was taken" if self.port_taken(handle) else "")
                checked[0] = time.monotonic()
            return not died[0]

        try:
            wait_ready(handle.connection, deadline, alive)
        except LaunchRejected as exc:
            raise LaunchRejected(f"{exc.message}: {died[0]}" if died[0] else exc.message) from exc

    # -- warm kernels (workers/warm.py) ---------------------------------------------------------

    def warm_fits(self, warm: KernelHandle, started_for: LaunchRequest,
                  req: LaunchRequest) -> str:
        """A warm kernel runs on its host as the pool's user: a request for another remote user
        (impersonation) or a warm kernel whose host is down starts cold."""
        host = self.hosts.get(str(warm.data.get("host", "")))
        if host is None:
            return f"the warm kernel's host {warm.data.get('host')!r} left the pool"
        down = self.placement.down(host.name)
        if down:
            return f"the warm kernel's host {host.label} is down ({down})"
        try:
            user, _ = choose_user(req.env.get("KERNEL_USERNAME", ""), host, self.options,
                                  self.local_user)
        except LaunchRejected as exc:
            return exc.message
        if user != warm.data.get("user"):
            return (f"the request runs as {user!r} on the hosts; warm kernels run as "
                    f"{warm.data.get('user')!r}")
        return ""

    def take_over(self, warm: KernelHandle, kernel_id: str) -> KernelHandle:
        """The warm kernel's host place becomes ``kernel_id``'s (stop() releases it by id)."""
        if self.placement.move(warm.kernel_id, kernel_id) is None:
            host = str(warm.data.get("host", ""))
            if not self.placement.claim(kernel_id, host).host:
                raise LaunchRejected(f"the warm kernel's place on host {host} was lost and the "
                                     f"host is full")
        return super().take_over(warm, kernel_id)

    # -- supervise ----------------------------------------------------------------------------

    def poll(self, handle: KernelHandle) -> str | None:
        found = self._handle_link(handle)
        if found is None:
            return f"host {handle.data.get('host')!r} is no longer in pool {self.pool.name}"
        host, link = found
        pid = int(handle.data.get("pid", 0))
        if not pid:
            return "the kernel was never started"
        why = self._check(host, max_age=self.options.check_interval)
        if why is None:
            try:
                if link.alive(pid, str(handle.data.get("dir", "")), self.options.poll_interval):
                    return None
                return f"the kernel process on host {host.name} is gone"
            except HostUnreachable as exc:
                why = exc.message.split(": ", 1)[-1]
        self._mark_down(host, why)
        return f"host {host.label} lost ({why}); its kernel is dead"

    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        found = self._handle_link(handle)
        pid = int(handle.data.get("pid", 0))
        if found is None or not pid:
            return
        try:
            found[1].run(build_signal_script(pid, signum))
        except HostUnreachable as exc:
            log.warning("Kernel %s: signal %d not delivered: %s", handle.kernel_id, signum,
                        exc.message)

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        try:
            self._kill(handle, grace)
        finally:
            if self.registry is not None:
                self.placement.release(handle.kernel_id)

    def _kill(self, handle: KernelHandle, grace: float) -> None:
        """Graceful wait, SIGTERM, SIGKILL to the remote group; remove the remote folder."""
        found = self._handle_link(handle)
        folder = str(handle.data.get("dir") or "")
        if found is None or not folder:
            return
        host, link = found
        if not link.active and self._check(host, max_age=1.0) is not None:
            log.error("Kernel %s: host %s is unreachable; could not stop pid %s or remove %s "
                      "there: an operator should check", handle.kernel_id, host.label,
                      handle.data.get("pid"), folder)
            return
        pid = int(handle.data.get("pid", 0))
        link.forget(pid)
        try:
            res = link.run(build_stop_script(pid, folder, grace),
                           timeout=grace + self.options.command_timeout)
        except HostUnreachable as exc:
            log.error("Kernel %s: could not stop pid %s on %s (%s): an operator should check",
                      handle.kernel_id, pid, host.label, exc.message)
            self._mark_down(host, exc.message.split(": ", 1)[-1])
            return
        if res.rc == 3:
            log.error("Kernel %s: pid %d on %s survived SIGKILL", handle.kernel_id, pid, host.label)

    def failure_detail(self, handle: KernelHandle) -> str:
        found = self._handle_link(handle)
        folder = str(handle.data.get("dir") or "")
        if found is None or not folder:
            return ""
        if self._check(found[0], max_age=self.options.check_interval) is not None:
            return ""  # a lost host: its output is lost with it
        try:
            return found[1].run(build_tail_script(folder), timeout=10).out.strip()
        except HostUnreachable:
            return ""


__all__ = ["SSHLauncher", "SSHOptions", "SSHHost", "HostLink", "HostUnreachable"]

"""local: kernels as processes on the worker's own machine, each in its own process group."""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import psutil

from ..config import python_argv
from ..errors import LaunchRejected, LaunchTimeout
from ..kernel_socket import KernelSocket
from ..protocol import ConnectionInfo, KernelHandle, LaunchRequest
from ..resources import Confinement, Confiner, Limits, cleanup
from .base import Launcher, without_worker_secrets
from .forking import UNKNOWN, Forked, ForkServer, why_not
from .local_builders import CHANNELS, LocalOptions, build_connection, parse_port_range

log = logging.getLogger(__name__)


_PORT_LOCK = threading.Lock()
_RECENT: collections.deque[int] = collections.deque(maxlen=4096)


def below_ephemeral(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """Ports for kernels when no ``port_range`` is set: below the system's ephemeral range.

    Outgoing connections (the gateway's and the supervisor's to other kernels, Redis...) take
    their local ports from the ephemeral range; a kernel port picked from it can be taken by
    one of them before the kernel binds it, or a connection to the kernel made before it binds
    can connect to itself (TCP self-connect). Below the range neither can happen."""
    try:
        low = int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (10000, low - 1) if low > 12000 else None


def pick_ports(ip: str, port_range: tuple[int, int], count: int = 5) -> list[int]:
    """Free ports from ``port_range``, tried by binding; the kernel binds them right after."""
    lo, hi = port_range
    found: list[int] = []
    with _PORT_LOCK:
        start = lo + (uuid.uuid4().int % (hi - lo + 1))
        for i in range(hi - lo + 1):
            port = lo + (start - lo + i) % (hi - lo + 1)
            if port in _RECENT:  # handed out a moment ago: its kernel may not have bound it yet
                continue
            with socket.socket() as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    continue
            found.append(port)
            if len(found) == count:
                _RECENT.extend(found)
                return found
    raise LaunchRejected(f"no {count} free ports left in port range {lo}-{hi}")


def free_ports(ip: str, count: int = 5) -> list[int]:
    """Ports the system has free now (bound to port 0 together, then released), none handed
    out recently by this process: the kernel's ports are known before it starts, so nobody
    polls its connection file (as jupyter_client does it)."""
    found: list[int] = []
    with _PORT_LOCK:
        held = []
        try:
            while len(found) < count:
                s = socket.socket()
                held.append(s)
                s.bind((ip, 0))
                port = s.getsockname()[1]
                if port not in _RECENT:
                    found.append(port)
        finally:
            for s in held:
                s.close()
        _RECENT.extend(found)
    return found


def build_command(argv: tuple[str, ...], connection_file: str, resource_dir: str) -> list[str]:
    """The kernelspec's argv with its placeholders filled in."""
    cmd = python_argv(argv)
    return [a.replace("{connection_file}", connection_file).replace("{resource_dir}", resource_dir)
            for a in cmd]


def build_env(base: dict[str, str], req: LaunchRequest) -> dict[str, str]:
    """The kernel's environment: the worker's (less its credentials), the spec's, the
    request's, and KERNEL_ID."""
    env = without_worker_secrets(base)
    env.update(req.spec_env)
    env.update(req.env)
    env["KERNEL_ID"] = req.kernel_id
    # No JPY_PARENT_PID: a kernel outlives a worker killed with SIGKILL, so that the worker's
    # next life can adopt it or, past the heartbeat TTL, kill it (see supervisor.reap_orphans).
    env.pop("JPY_PARENT_PID", None)
    env.pop("CELERY_LOADER", None)
    return env


def wait_ready(conn: ConnectionInfo, deadline: float, alive: Callable[[], bool]) -> None:
    """Block until the kernel answers a kernel_info_request on its shell channel."""
    with KernelSocket(conn, reconnect_ivl=10) as sock:
        sock.send("kernel_info_request")
        while time.monotonic() < deadline:
            if sock.answered(0.05):
                return
            if not alive():
                raise LaunchRejected("the kernel exited while starting")
        raise LaunchTimeout("the kernel did not answer kernel_info_request in time")


class LocalLauncher(Launcher):
    """Hosts ipykernel (or any kernelspec's) processes on this machine."""

    Options = LocalOptions

    def __init__(self, pool, options, runtime_dir):  # type: ignore[no-untyped-def]
        super().__init__(pool, options, runtime_dir)
        self.port_range = parse_port_range(options.port_range) or (
            below_ephemeral() if options.transport == "tcp" else None)
        self._procs: dict[int, subprocess.Popen[bytes] | Forked] = {}
        self.confiner = Confiner()
        self._forkservers: dict[str, ForkServer] = {}
        self._fork_lock = threading.Lock()

    def prepare(self) -> None:
        if self.options.fork_kernels:  # the interpreter of the packaged kernelspec
            self._forkserver(sys.executable).start()

    def _forkserver(self, python: str) -> ForkServer:
        with self._fork_lock:
            if python not in self._forkservers:
                self._forkservers[python] = ForkServer(
                    python, Path(self.runtime_dir) / f"forkserver-{len(self._forkservers)}.log")
            return self._forkservers[python]

    def _fork(self, cmd: list[str], env: dict[str, str], cwd: str | None,
              log_file: Path) -> Forked | None:
        """The kernel forked from a process that has imported ipykernel already (see
        forkserver.py), or None where it must be exec'd."""
        if not self.options.fork_kernels or not os.path.isabs(cmd[0]):
            return None
        server = self._forkserver(cmd[0])
        reason = why_not(cmd, env, server.env)
        if reason:
            log.debug("Kernel %s is exec'd: %s", env.get("KERNEL_ID"), reason)
            return None
        return server.spawn(cmd, env, cwd or os.getcwd(), log_file, self.options.lean_execute,
                            self.options.subshells)

    def close(self) -> None:
        for server in list(self._forkservers.values()):
            server.close()

    @classmethod
    def runs_here(cls, options: LocalOptions) -> str | None:
        return None

    def _dir(self, kid: str) -> Path:
        return Path(self.runtime_dir) / kid

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        deadline = time.monotonic() + req.launch_timeout
        ports = None
        key = uuid.uuid4().hex
        if previous is not None and previous.connection is not None:
            key = previous.connection.key
            ports = [getattr(previous.connection, f"{c}_port") for c in CHANNELS]
        else:
            ports = self._fresh_ports()
        handle: KernelHandle | None = None
        for attempt in (1, 2):
            handle = yield from self._start(req, key, ports, deadline)
            if handle.connection is not None:
                started = handle
                try:  # a kernel that could not bind a port hangs (ipykernel 7): ask its log
                    wait_ready(handle.connection, deadline,
                               lambda: self.poll(started) is None and not self.port_taken(started))
                    break
                except LaunchRejected:
                    if ports is None or attempt == 2 or not self.port_taken(handle):
                        raise
            elif ports is None or attempt == 2:
                raise LaunchRejected("the kernel exited while starting")
            # The ports were taken meanwhile: start once more on fresh ones.
            log.info("Kernel %s: its ports were taken; starting it on others", req.kernel_id)
            self.stop(handle, grace=0)
            ports = self._fresh_ports()
        assert handle is not None
        yield handle

    def _fresh_ports(self) -> list[int] | None:
        """Ports for a new kernel: from ``port_range`` (by default below the ephemeral range),
        else any free ones; None for a transport that has no ports (the kernel picks)."""
        if self.port_range:
            return pick_ports(self.options.ip, self.port_range)
        return free_ports(self.options.ip) if self.options.transport == "tcp" else None

    def _start(self, req: LaunchRequest, key: str, ports: list[int] | None,
               deadline: float) -> Generator[KernelHandle, None, KernelHandle]:
        """Yields the handle once the process exists, then returns it with its connection."""
        folder = self._dir(req.kernel_id)
        folder.mkdir(parents=True, exist_ok=True)
        cfile = folder / "connection.json"
        cfile.write_text(json.dumps(build_connection(self.options.ip, key, ports,
                                                     self.options.transport)))
        cfile.chmod(0o600)
        resource_dir = str(req.resources.get("resource_dir", ""))
        cmd = build_command(req.argv, str(cfile), resource_dir)
        env = build_env(dict(os.environ), req)
        try:  # refused (resources) or not started: no stop() comes, so nothing may be left
            held = self.confine(req, env)
            cmd = [*held.prefix, *cmd]
            cwd = req.working_dir if req.working_dir and os.path.isdir(req.working_dir) else None
            forked = self._fork(cmd, env, cwd, folder / "kernel.log") if not held.prefix else None
            proc: subprocess.Popen[bytes] | Forked = forked if forked is not None else \
                self._exec(cmd, env, cwd, folder / "kernel.log", held.data)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._procs[proc.pid] = proc
        created = psutil.Process(proc.pid).create_time() if psutil.pid_exists(proc.pid) else 0.0
        handle = KernelHandle(req.kernel_id, req.pool, host=socket.gethostname(),
                              data={"pid": proc.pid, "create_time": created, "dir": str(folder),
                                    **held.data})
        yield handle
        conn = self._wait_connection_file(cfile, proc, deadline)
        return KernelHandle(handle.kernel_id, handle.pool, handle.host, conn, handle.data)

    @staticmethod
    def _exec(cmd: list[str], env: dict[str, str], cwd: str | None, log_file: Path,
              held: dict[str, object]) -> subprocess.Popen[bytes]:
        log = open(log_file, "ab")
        try:
            return subprocess.Popen(cmd, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            cleanup(held)
            raise LaunchRejected(f"cannot run {cmd[0]!r}: {exc.strerror}") from exc
        finally:
            log.close()

    def _wait_connection_file(self, cfile: Path, proc: subprocess.Popen[bytes] | Forked,
                              deadline: float) -> ConnectionInfo | None:
        """The kernel rewrites its connection file once its sockets are bound."""
        while time.monotonic() < deadline:
            try:
                data = json.loads(cfile.read_text())
            except (OSError, ValueError):
                data = {}
            if data and all(data.get(f"{c}_port") for c in CHANNELS):
                if proc.poll() is None:
                    return ConnectionInfo.from_dict(data)
            if proc.poll() is not None:
                return None
            time.sleep(0.005)
        raise LaunchTimeout("the kernel did not open its ports in time")

    def _process(self, handle: KernelHandle) -> psutil.Process | None:
        pid = int(handle.data.get("pid", 0))
        if not pid:
            return None
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - float(handle.data.get("create_time", 0))) > 1.0:
                return None  # the pid was reused by another process
            return p
        except psutil.Error:
            return None

    def poll(self, handle: KernelHandle) -> str | None:
        pid = int(handle.data.get("pid", 0))
        proc = self._procs.get(pid)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return None
            return ("the kernel process exited" if rc == UNKNOWN
                    else f"the kernel process exited with code {rc}")
        p = self._process(handle)
        if p is None or p.status() == psutil.STATUS_ZOMBIE:
            return "the kernel process is gone"
        return None

    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        pid = int(handle.data.get("pid", 0))
        if pid and self.poll(handle) is None:
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        pid = int(handle.data.get("pid", 0))
        deadline = time.monotonic() + grace
        while self.poll(handle) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 2.0)):
            if self.poll(handle) is not None:
                break
            self.send_signal(handle, sig)
            end = time.monotonic() + wait
            while self.poll(handle) is None and time.monotonic() < end:
                time.sleep(0.02)
        if pid:  # whatever the kernel left in its process group goes too
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError as exc:
                if exc.errno not in (errno.ESRCH, errno.EPERM):
                    raise
            proc = self._procs.pop(pid, None)
            if proc is not None:
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                if isinstance(proc, Forked):
                    proc.close()
        shutil.rmtree(handle.data.get("dir") or self._dir(handle.kernel_id), ignore_errors=True)
        cleanup(handle.data)

    def confine(self, req: LaunchRequest, env: dict[str, str]) -> Confinement:
        """Called by launch for each kernel process, before it starts: hold it to its cpus and
        memory (workers/resources.py). Subclasses may add to ``env``; they return super()'s."""
        return self.confiner.plan(req.kernel_id, Limits.of(req.resources))

    def failure_detail(self, handle: KernelHandle) -> str:
        path = Path(handle.data.get("dir") or self._dir(handle.kernel_id)) / "kernel.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 2000))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

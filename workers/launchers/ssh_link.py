"""ssh launcher, connection half: one reused SSH connection per host and user, and host checks.

The rule of this module: every socket or paramiko failure leaves it as HostUnreachable naming
the host, so the launcher can tell a host that is gone from a kernel that failed. Host keys are
checked against ``known_hosts`` (auto-accept only when the pool says so, and then it is logged);
a private key is only ever a path handed to paramiko, never logged, stored or returned.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable
from .ssh_builders import SSHHost, SSHOptions, build_poll_script, parse_pids

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)
CHANNELS_PER_LINK = 8  # below sshd's MaxSessions (10): more would be refused, not queued

class HostUnreachable(BackendUnavailable):
    """The host refused, timed out, or failed the SSH handshake (never a kernel's fault)."""


def paramiko_module() -> Any:
    try:
        import paramiko
    except ImportError as exc:
        raise ImportError("the ssh launcher needs paramiko: pip install 'poolgate[ssh]'") from exc
    return paramiko


@contextmanager
def ssh_errors(host: SSHHost) -> Iterator[None]:
    """Map socket and paramiko errors into HostUnreachable, naming the host."""
    pk = paramiko_module()
    try:
        yield
    except HostUnreachable:
        raise
    except TimeoutError as exc:
        raise HostUnreachable(f"host {host.label}: timed out") from exc
    except pk.BadHostKeyException as exc:
        raise HostUnreachable(f"host {host.label}: its host key does not match known_hosts "
                              f"(possible man-in-the-middle; an operator must check)") from exc
    except pk.AuthenticationException as exc:
        raise HostUnreachable(f"host {host.label}: authentication failed ({exc})") from exc
    except pk.SSHException as exc:
        raise HostUnreachable(f"host {host.label}: {exc}") from exc
    except pk.ssh_exception.NoValidConnectionsError as exc:  # one OSError per address tried
        why = sorted({(e.strerror or str(e)).lower() for e in exc.errors.values()})
        raise HostUnreachable(f"host {host.label}: {', '.join(why)}") from exc
    except OSError as exc:
        raise HostUnreachable(f"host {host.label}: {exc.strerror or exc}") from exc
    except EOFError as exc:
        raise HostUnreachable(f"host {host.label}: the connection closed") from exc


def probe(host: SSHHost, timeout: float) -> str | None:
    """None if the host's sshd accepts a connection and greets; else why not."""
    try:
        with socket.create_connection((host.address, host.port), timeout=timeout) as s:
            s.settimeout(timeout)
            if not s.recv(64).startswith(b"SSH-"):
                return "no SSH greeting"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@dataclass
class Result:
    rc: int
    out: str
    err: str


class HostLink:
    """One reused SSH connection to one host as one user, with keepalive; thread-safe."""

    def __init__(self, host: SSHHost, user: str, options: SSHOptions, pool: str) -> None:
        self.host = host
        self.user = user
        self.options = options
        self.pool = pool
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._channels = threading.BoundedSemaphore(CHANNELS_PER_LINK)
        self._watched: dict[int, str] = {}  # pid → kernel folder, for the batched poll
        self._seen: tuple[float, frozenset[int], frozenset[int]] = (0.0, frozenset(), frozenset())
        self._poll_lock = threading.Lock()

    def _connect(self) -> paramiko.SSHClient:
        pk = paramiko_module()
        client: paramiko.SSHClient = pk.SSHClient()
        known = Path(self.options.known_hosts).expanduser()
        if known.is_file():
            client.load_host_keys(str(known))
        if self.options.auto_add_host_keys:
            log.warning("Pool %s: accepting the host key of %s without checking it "
                        "(auto_add_host_keys is on)", self.pool, self.host.label)
            client.set_missing_host_key_policy(pk.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(pk.RejectPolicy())
        key_file = self.options.key_for(self.host)
        with ssh_errors(self.host):
            try:
                client.connect(self.host.address, port=self.host.port, username=self.user,
                               key_filename=str(Path(key_file).expanduser()) if key_file else None,
                               timeout=self.options.connect_timeout,
                               banner_timeout=self.options.connect_timeout,
                               auth_timeout=self.options.connect_timeout,
                               allow_agent=False, look_for_keys=not key_file)
            except pk.SSHException as exc:
                client.close()
                if "known_hosts" in str(exc):
                    raise HostUnreachable(
                        f"host {self.host.label}: its host key is not in {known}; add it "
                        f"(ssh-keyscan -p {self.host.port} {self.host.address}) or set "
                        f"auto_add_host_keys: true") from exc
                raise
            except BaseException:
                client.close()
                raise
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(max(1, int(self.options.keepalive)))
        log.info("Pool %s: connected to %s as %s", self.pool, self.host.label, self.user)
        return client

    def client(self) -> paramiko.SSHClient:
        with self._lock:
            c = self._client
            transport = c.get_transport() if c is not None else None
            if c is None or transport is None or not transport.is_active():
                if c is not None:
                    c.close()
                self._client = None
                self._client = c = self._connect()
            return c

    @property
    def active(self) -> bool:
        c = self._client
        t = c.get_transport() if c is not None else None
        return bool(t is not None and t.is_active())

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def run(self, script: str, timeout: float | None = None) -> Result:
        """Feed ``script`` to ``sh -s`` on the host; HostUnreachable if the link fails.

        A connection that broke since its last use is replaced once before giving up, so
        one dropped TCP connection does not make a host look lost.
        """
        timeout = timeout or self.options.command_timeout
        if not self._channels.acquire(timeout=timeout):
            raise HostUnreachable(f"host {self.host.label}: {CHANNELS_PER_LINK} commands "
                                  f"already running there for {timeout:.0f}s")
        try:
            for attempt in (1, 2):
                reused = self.active
                try:
                    return self._run(script, timeout)
                except HostUnreachable:
                    self.close()
                    if attempt == 2 or not reused:
                        raise
            raise AssertionError("unreachable")
        finally:
            self._channels.release()

    def alive(self, pid: int, folder: str, max_age: float) -> bool:
        """Whether kernel ``pid`` runs. One command checks every kernel watched on this link,
        at most every ``max_age`` seconds; the supervisors of all of them share its answer."""
        with self._poll_lock:
            self._watched[pid] = folder
            at, checked, alive = self._seen
            if pid in checked and time.monotonic() - at < max_age:
                return pid in alive
            watched = dict(self._watched)
            alive = frozenset(parse_pids(self.run(build_poll_script(watched)).out))
            self._seen = (time.monotonic(), frozenset(watched), alive)
            for gone in set(watched) - alive:
                self._watched.pop(gone, None)
            return pid in alive

    def forget(self, pid: int) -> None:
        """Stop polling ``pid`` (its kernel was stopped)."""
        with self._poll_lock:
            self._watched.pop(pid, None)

    def _run(self, script: str, timeout: float) -> Result:
        with ssh_errors(self.host):
            transport = self.client().get_transport()
            assert transport is not None
            chan = transport.open_session(timeout=timeout)
            try:
                chan.settimeout(timeout)
                chan.exec_command("sh -s")
                chan.sendall(script.encode())
                chan.shutdown_write()
                out = chan.makefile("rb").read().decode(errors="replace")
                err = chan.makefile_stderr("rb").read().decode(errors="replace")
                if not chan.status_event.wait(timeout):
                    raise TimeoutError("no exit status")
                return Result(chan.exit_status, out, err)
            finally:
                chan.close()

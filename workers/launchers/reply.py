"""The worker's half of the kernel launcher's reply: one listener, one accepted reply per launch.

A remote launcher (docker, docker-swarm, later kubernetes and yarn) calls :meth:`ReplyListener.
expect` for each launch, puts the returned environment into the kernel's container, and waits in
:meth:`ReplyListener.wait`. The kernel launcher (``poolgate/kernel_launcher.py``) connects to the
listener and sends ``poolgate-reply/1 <launch id> <Fernet token>``; the token, sealed with the
launch's own key, carries the launch's one-time token and the kernel's connection info (or why
the kernel could not start).

The rule of this module: exactly one authenticated reply is taken per launch. Anything else is
refused with ``refused`` and a WARNING naming the peer and the reason: a line over the size
limit, a line not complete within ``read_timeout``, garbage, an unknown launch id, a reply for a
launch that already has one (a replay) or that is over (late), a token that does not
authenticate with the launch's key, or a payload whose token or kernel id is not the launch's.
The kernel's container gets only this launch's key and token: no registry or broker secret.
"""
from __future__ import annotations

import collections
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from ...kernel_launcher import CHANNELS, MAGIC, MAX_REPLY, command_line, read_line, unseal
from ..errors import LaunchRejected, LaunchTimeout
from ..protocol import ConnectionInfo

log = logging.getLogger(__name__)


@dataclass
class Expectation:
    """One launch waiting for its reply."""

    kernel_id: str
    launch_id: str
    key: str
    token: str
    address: str
    created: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    payload: dict[str, Any] | None = None

    def env(self) -> dict[str, str]:
        """What the kernel launcher's environment must hold for this launch."""
        return {"POOLGATE_RESPONSE_ADDRESS": self.address, "POOLGATE_RESPONSE_KEY": self.key,
                "POOLGATE_RESPONSE_TOKEN": self.token, "POOLGATE_LAUNCH_ID": self.launch_id,
                "POOLGATE_KERNEL_ID": self.kernel_id}


@dataclass(frozen=True)
class LauncherReply:
    """What an accepted, successful reply says."""

    connection: ConnectionInfo
    pid: int
    command_port: int


class ReplyListener:
    """A TCP listener for kernel launchers' replies, shared by the launches of one launcher."""

    def __init__(self, bind_ip: str = "0.0.0.0", port: int = 0, advertise: str = "",
                 max_bytes: int = MAX_REPLY, read_timeout: float = 5.0,
                 max_age: float = 900.0, max_open: int = 64) -> None:
        self.bind_ip, self.port, self.advertise = bind_ip, port, advertise
        self.max_bytes, self.read_timeout, self.max_age = max_bytes, read_timeout, max_age
        self.pending: dict[str, Expectation] = {}
        self.finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.refused: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._open = threading.BoundedSemaphore(max_open)  # connections read at once

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ReplyListener:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind_ip, self.port))
        sock.listen(64)
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        threading.Thread(target=self._serve, daemon=True, name="launcher-replies").start()
        log.info("Waiting for kernel launcher replies on %s:%d", self.bind_ip, self.port)
        return self

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    @property
    def started(self) -> bool:
        return self._sock is not None

    # -- launches -------------------------------------------------------------------------

    def expect(self, kernel_id: str, host: str) -> Expectation:
        """Register a launch; ``host`` is where the kernel launcher reaches this listener."""
        exp = Expectation(kernel_id=kernel_id, launch_id=secrets.token_hex(12),
                          key=Fernet.generate_key().decode(), token=secrets.token_urlsafe(24),
                          address=f"{self.advertise or host}:{self.port}")
        with self._lock:
            self.pending[exp.launch_id] = exp
        return exp

    def cancel(self, exp: Expectation, why: str = "late") -> None:
        """The launch is over: a reply that comes now is refused as ``why``."""
        with self._lock:
            if self.pending.pop(exp.launch_id, None) is not None:
                self._finish(exp.launch_id, why)

    def wait(self, exp: Expectation, deadline: float,
             died: Callable[[], str | None] = lambda: None) -> LauncherReply:
        """The reply's connection info. LaunchRejected when the launcher reports a failure or
        ``died()`` says the kernel's container ended; LaunchTimeout at ``deadline``."""
        try:
            while not exp.done.wait(0.25):
                if time.monotonic() >= deadline:
                    raise LaunchTimeout(f"kernel {exp.kernel_id}: no reply from its kernel "
                                        f"launcher in time (it reports to {exp.address})")
                why = died()
                if why is not None:
                    exp.done.wait(1.0)  # its error report may be on the way
                    if exp.payload is None:
                        raise LaunchRejected(f"kernel {exp.kernel_id}: {why}")
            return self.parse(exp)
        finally:
            self.cancel(exp)

    @staticmethod
    def parse(exp: Expectation) -> LauncherReply:
        data = exp.payload or {}
        if not data.get("ok"):
            out = str(data.get("output") or "").strip()
            msg = f"kernel {exp.kernel_id}: the kernel launcher reports: {data.get('error')}"
            raise LaunchRejected(f"{msg}\n--- kernel output (last lines) ---\n{out}" if out
                                 else msg)
        try:
            conn = ConnectionInfo.from_dict({
                "ip": str(data["ip"]), "key": str(data["key"]),
                "transport": str(data.get("transport", "tcp")),
                "signature_scheme": str(data.get("signature_scheme", "hmac-sha256")),
                **{f"{c}_port": int(data[f"{c}_port"]) for c in CHANNELS}})
            return LauncherReply(conn, int(data.get("pid", 0)), int(data.get("command_port", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise LaunchRejected(f"kernel {exp.kernel_id}: the kernel launcher's reply lacks "
                                 f"{exc}") from None

    # -- the listener thread --------------------------------------------------------------

    def _finish(self, launch_id: str, why: str) -> None:
        self.finished[launch_id] = why
        while len(self.finished) > 4096:
            self.finished.popitem(last=False)

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            if not self._open.acquire(blocking=False):  # a flood: refuse, do not queue
                self.refused["busy"] += 1
                log.warning("Refused a kernel launcher reply from %s: busy: too many open "
                            "connections", peer[0])
                conn.close()
                continue
            threading.Thread(target=self._take, args=(conn, peer[0]), daemon=True,
                             name="launcher-reply").start()

    def _take(self, conn: socket.socket, peer: str) -> None:
        try:
            self._read(conn, peer)
        finally:
            self._open.release()

    def _read(self, conn: socket.socket, peer: str) -> None:
        with conn:
            try:
                line = read_line(conn, self.max_bytes, time.monotonic() + self.read_timeout)
                self.accept(line, peer)
                conn.sendall(b"ok\n")
            except (ValueError, TimeoutError) as exc:
                reason = str(exc)
                self.refused[reason.split(":")[0]] += 1
                log.warning("Refused a kernel launcher reply from %s: %s", peer, reason)
                try:
                    conn.sendall(b"refused\n")
                except OSError:
                    pass
            except OSError:
                log.warning("A kernel launcher reply from %s broke off", peer, exc_info=True)

    def accept(self, line: bytes, peer: str = "?") -> Expectation:
        """Take one reply line; ValueError (the reason) if it must be refused."""
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] != MAGIC:
            raise ValueError("garbage: not a poolgate reply")
        launch_id = parts[1].decode(errors="replace")
        with self._lock:
            exp = self.pending.get(launch_id)
            if exp is None:
                why = self.finished.get(launch_id)
                raise ValueError(f"{why}: launch {launch_id[:40]!r} takes no more replies"
                                 if why else f"unknown launch {launch_id[:40]!r}")
            if time.monotonic() - exp.created > self.max_age:
                raise ValueError(f"late: launch {launch_id} is {self.max_age:.0f}s old")
            try:
                payload = unseal(exp.key, parts[2], ttl=self.max_age)
            except (InvalidToken, ValueError):
                raise ValueError(f"forged: the reply for launch {launch_id} does not "
                                 "authenticate with its key") from None
            if payload.get("token") != exp.token or payload.get("kernel_id") != exp.kernel_id:
                raise ValueError(f"wrong token or kernel id for launch {launch_id}")
            del self.pending[launch_id]
            self._finish(launch_id, "replay")
        exp.payload = payload
        exp.done.set()
        log.info("Kernel %s: its kernel launcher replied from %s (%s)", exp.kernel_id, peer,
                 "started" if payload.get("ok") else "failed")
        return exp


def send_command(ip: str, port: int, connection_key: str, kernel_id: str, signum: int,
                 timeout: float = 5.0) -> str:
    """Ask a kernel launcher to signal its kernel; its answer (``ok`` or why not)."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.sendall(command_line(connection_key, kernel_id, signum))
            return read_line(s, 256, time.monotonic() + timeout).decode(errors="replace") or \
                "refused"
    except (OSError, ValueError, TimeoutError) as exc:
        return f"unreachable: {exc}"

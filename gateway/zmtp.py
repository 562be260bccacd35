"""ZMTP 3.0 (RFC 23, NULL security) spoken over a plain socket: the gateway's end of a kernel's
shell, control, stdin (DEALER) and iopub (SUB) channels.

Two layers. :class:`Connection` is the protocol and nothing else (no socket, no clock, as h11):
bytes in → whole messages out, messages in → bytes out, the handshake a table of states
(:data:`HANDSHAKE`). It answers a ZMTP 3.1 PING with a PONG (a kernel with ZMQ heartbeats on
drops a peer that does not), caps frame and message sizes, and raises nothing but
:class:`ZmtpError`, whatever it is fed. :class:`Peer` owns the socket and reconnects.

Why not libzmq here: a libzmq socket hands every message to and from its own I/O thread, so a
message crossing the gateway woke two threads (the pump and libzmq's) where a jupyter_client
talking to the kernel directly wakes one. With the protocol spoken here the pump polls the
kernel's TCP connections beside the client's WebSocket and moves a message with one wake-up
each way. The kernel keeps its libzmq (ROUTER and XPUB); nothing changes on its side.

What a :class:`Peer` does, as libzmq's DEALER/SUB would for one endpoint:
* connects without blocking, and reconnects (0.1 s, doubling to 0.5 s) when the kernel's end
  closes (a restart at the same ports), announcing its identity and subscription again;
* queues what is sent before the handshake, or while reconnecting (no high-water mark: nothing
  is dropped; a message cut by a lost connection is not sent again, as in libzmq);
* reads everything the kernel sends into :attr:`inbox` whenever the pump polls it readable, so
  the kernel's high-water mark is never what decides whether output is kept.
"""
from __future__ import annotations

import collections
import errno
import logging
import select
import socket
import time

from .sockio import send_some
from .zmtp_protocol import (
    COMMAND,
    MAX_FRAME,
    MAX_MESSAGE,
    PEERS,
    Connection,
    State,
    ZmtpError,
    command,
    command_frame,
    encode,
    greeting,
)

# What gateway/channels/ and the tests use from here; the protocol's own names are re-exported.
__all__ = ["COMMAND", "Connection", "Peer", "READ_SIZE", "ZmtpError", "address", "command",
           "command_frame", "encode", "greeting"]

log = logging.getLogger(__name__)

RECONNECT_FIRST, RECONNECT_MAX = 0.1, 0.5
READ_SIZE = 1 << 18
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT


def address(url: str) -> tuple[int, str | tuple[str, int]]:
    """(family, address) for a kernel's ``tcp://ip:port`` or ``ipc://path`` URL."""
    scheme, _, rest = url.partition("://")
    if scheme == "ipc":
        return socket.AF_UNIX, rest
    if scheme != "tcp":
        raise ValueError(f"unsupported transport in {url!r}")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host == "*":
        host = "127.0.0.1"
    return family, (host, int(port))


class Peer:
    """One DEALER or SUB connection to one kernel socket, driven by its owner's poll loop.

    The owner polls :meth:`fileno` for :meth:`wanted` and calls :meth:`handle` with what
    fired; :meth:`send` queues a message and writes what the socket takes at once; whole
    messages received wait in :attr:`inbox`. Call :meth:`tick` when :attr:`retry_at` is due.
    The protocol is a :class:`~gateway.zmtp_protocol.Connection`, a new one per connection.
    """

    def __init__(self, url: str, kind: bytes, identity: bytes = b"", name: str = "", *,
                 max_frame: int = MAX_FRAME, max_message: int = MAX_MESSAGE) -> None:
        if kind not in PEERS:
            raise ValueError(f"unsupported socket type {kind!r}")
        self.url, self.kind, self.identity, self.name = url, kind, identity, name
        self.max_frame, self.max_message = max_frame, max_message
        self.family, self.addr = address(url)
        self.sock: socket.socket | None = None
        self.conn = self._protocol()
        self.connecting = False
        self.ready = False  # handshake done: messages flow
        self.inbox: collections.deque[list[bytes]] = collections.deque()
        self.queue: collections.deque[list[bytes]] = collections.deque()  # messages not yet written
        self.wbuf: list[bytes | memoryview] = []  # wire parts being written
        self.retry_at: float | None = None
        self.backoff = RECONNECT_FIRST
        self.closed = False
        self.connects = 0
        self._connect()

    # -- the owner's loop -----------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def wanted(self) -> int:
        if self.sock is None:
            return 0
        if self.connecting or self.wbuf:
            return POLLIN | POLLOUT
        return POLLIN

    def handle(self, events: int) -> None:
        """The socket fired ``events`` (poll flags): finish connecting, write, read."""
        if self.sock is None:
            return
        try:
            if self.connecting:
                if not events & (POLLOUT | select.POLLERR | select.POLLHUP):
                    return
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, errno.errorcode.get(err, "connect failed"))
                self._connected()
            if events & POLLOUT and self.wbuf:
                self._write()
            if events & (POLLIN | select.POLLERR | select.POLLHUP):
                self._read()
        except (OSError, ZmtpError) as exc:
            self._lost(exc)

    def tick(self, now: float) -> None:
        if self.retry_at is not None and now >= self.retry_at and not self.closed:
            self.retry_at = None
            self._connect()

    def send(self, frames: list[bytes]) -> None:
        """Send one message; what the socket does not take now goes when it is writable."""
        if self.closed:
            raise ZmtpError("socket closed")
        if not self.ready:
            self.queue.append(frames)
            return
        idle = not self.wbuf
        self.wbuf += encode(frames)  # Connection.send without its check: ready says it holds
        if idle:  # nothing was waiting: write at once (else the socket is polled for POLLOUT)
            try:
                self._write()
            except OSError as exc:
                self._lost(exc)

    def close(self) -> None:
        self.closed = True
        self.retry_at = None
        self._drop()

    # -- connection -----------------------------------------------------------------------

    def _protocol(self) -> Connection:
        return Connection(self.kind, self.identity, max_frame=self.max_frame,
                          max_message=self.max_message)

    def _connect(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.connecting, self.ready = sock, True, False
        self.conn = self._protocol()
        self.connects += 1
        try:
            err = sock.connect_ex(self.addr)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
        if err in (0, errno.EISCONN):
            try:
                self._connected()
            except OSError as exc:
                self._lost(exc)
        elif err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._lost(OSError(err, errno.errorcode.get(err, "connect failed")))

    def _connected(self) -> None:
        self.connecting = False
        # Only the handshake is written until the peer's READY: what was queued goes after it.
        self.wbuf = [self.conn.start()]
        self._write()

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.connecting = self.ready = False
        self.wbuf = []  # sent on a connection that is gone: lost, as in libzmq's engine buffer

    def _lost(self, exc: Exception) -> None:
        if isinstance(exc, ZmtpError):
            log.warning("ZMTP %s: %s; reconnecting", self.url, exc)
        else:
            log.debug("ZMTP %s: connection lost (%s); reconnecting", self.url, exc)
        self._drop()
        if not self.closed:
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, RECONNECT_MAX)

    def _answer(self) -> None:
        """After a read: write what the protocol owes the peer, and on its READY what waited."""
        conn = self.conn
        idle = not self.wbuf
        if conn.outgoing:
            self.wbuf += conn.outgoing
            conn.outgoing.clear()
        if not self.ready and conn.state is State.OPEN:
            self.ready = True
            self.backoff = RECONNECT_FIRST
            for frames in self.queue:
                self.wbuf += encode(frames)
            self.queue.clear()
        if idle and self.wbuf:
            self._write()

    # -- bytes ----------------------------------------------------------------------------

    def _write(self) -> None:
        assert self.sock is not None
        send_some(self.sock, self.wbuf)

    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise ConnectionResetError("the kernel closed the connection")
        conn = self.conn
        try:
            messages = conn.receive_data(data)
        except ZmtpError as exc:  # what came whole before the error is kept
            self.inbox.extend(exc.messages)
            raise
        if messages:
            self.inbox.extend(messages)
        if conn.outgoing or not self.ready and conn.state is State.OPEN:
            self._answer()

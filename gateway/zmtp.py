"""ZMTP 3.0 (RFC 23, NULL security) spoken over a plain socket: the gateway's end of a kernel's
shell, control, stdin (DEALER) and iopub (SUB) channels.

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
import struct
import time

from gateway import framing

log = logging.getLogger(__name__)

SIGNATURE = b"\xff" + b"\0" * 8 + b"\x7f"
GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 0.5
READ_SIZE = 1 << 18
# The peer socket types each of ours may talk to (RFC 28, RFC 29).
PEERS = {b"DEALER": (b"ROUTER", b"DEALER"), b"SUB": (b"PUB", b"XPUB")}
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
_LONG_HEAD = struct.Struct("!BQ")


class ZmtpError(ValueError):
    """The peer does not speak ZMTP 3 as this end does; the connection is dropped."""


def greeting() -> bytes:
    """Our greeting: version 3.0 (so a libzmq peer takes subscriptions as messages), NULL."""
    return SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


def frame_head(size: int, flags: int) -> bytes:
    if size < 256:
        return bytes((flags, size))
    return _LONG_HEAD.pack(flags | LONG, size)


def command(name: bytes, props: dict[bytes, bytes]) -> bytes:
    body = bytes((len(name),)) + name + b"".join(
        bytes((len(k),)) + k + struct.pack("!I", len(v)) + v for k, v in props.items())
    return frame_head(len(body), COMMAND) + body


def parse_command(body: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """(name, properties) of a command frame's body (RFC 23: READY's metadata)."""
    n = body[0]
    name, pos, props = body[1:1 + n], 1 + n, {}
    if name != b"READY":
        return name, {}
    while pos < len(body):
        k = body[pos + 1:pos + 1 + body[pos]]
        pos += 1 + body[pos]
        (size,) = struct.unpack_from("!I", body, pos)
        props[k.lower()] = body[pos + 4:pos + 4 + size]
        pos += 4 + size
    return name, props


def encode(frames: list[bytes]) -> list[bytes]:
    """The wire parts of one message: a head before each frame (for one sendmsg)."""
    out: list[bytes] = []
    last = len(frames) - 1
    for i, f in enumerate(frames):
        out.append(frame_head(len(f), MORE if i < last else 0))
        out.append(f)
    return out


def address(url: str) -> tuple[int, object]:
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
    """

    def __init__(self, url: str, kind: bytes, identity: bytes = b"", name: str = "") -> None:
        if kind not in PEERS:
            raise ValueError(f"unsupported socket type {kind!r}")
        self.url, self.kind, self.identity, self.name = url, kind, identity, name
        self.family, self.addr = address(url)
        self.sock: socket.socket | None = None
        self.connecting = False
        self.ready = False  # handshake done: messages flow
        self.greeted = False
        self.rbuf = bytearray()  # bytes of a frame not yet whole
        self.need = 0  # how long rbuf must grow before it is parsed again
        self.parts: list[bytes] = []  # frames of the message being received
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
        except (IndexError, struct.error) as exc:  # a command cut short: not ZMTP as we know it
            self._lost(ZmtpError(f"malformed command ({exc})"))

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
        self.wbuf += encode(frames)
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

    def _connect(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.connecting, self.ready, self.greeted = sock, True, False, False
        self.rbuf.clear()
        self.need = 0
        self.parts.clear()
        self.connects += 1
        try:
            err = sock.connect_ex(self.addr)  # type: ignore[arg-type]
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
        props = {b"Socket-Type": self.kind}
        if self.kind == b"DEALER":
            props[b"Identity"] = self.identity
        # Only the handshake is written until the peer's READY: what was queued goes after it.
        self.wbuf = [greeting(), command(b"READY", props)]
        self._write()

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.connecting = self.ready = self.greeted = False
        self.wbuf = []  # sent on a connection that is gone: lost, as in libzmq's engine buffer
        self.rbuf.clear()
        self.need = 0
        self.parts.clear()

    def _lost(self, exc: Exception) -> None:
        if isinstance(exc, ZmtpError):
            log.warning("ZMTP %s: %s; reconnecting", self.url, exc)
        else:
            log.debug("ZMTP %s: connection lost (%s); reconnecting", self.url, exc)
        self._drop()
        if not self.closed:
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, RECONNECT_MAX)

    def _handshaken(self) -> None:
        self.ready = True
        self.backoff = RECONNECT_FIRST
        idle = not self.wbuf
        if self.kind == b"SUB":  # ZMTP 3.0: a subscription is a message, 0x01 then the topic
            self.wbuf += encode([b"\x01"])
        for frames in self.queue:
            self.wbuf += encode(frames)
        self.queue.clear()
        if idle and self.wbuf:
            self._write()

    # -- bytes ----------------------------------------------------------------------------

    def _write(self) -> None:
        assert self.sock is not None
        framing.send_some(self.sock, self.wbuf)

    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise ConnectionResetError("the kernel closed the connection")
        buf = self.rbuf
        if buf:
            buf += data
            if len(buf) < self.need:  # the frame begun is not whole yet: parse it once it is
                return
            data = bytes(buf)
            buf.clear()
        used = self._parse(data)
        if used < len(data):
            buf += memoryview(data)[used:]

    def _parse(self, data: bytes) -> int:
        """Take whole frames from ``data``; return how many bytes were used, and set ``need``
        to how many the rest must reach before a frame can be taken from it."""
        pos, end = 0, len(data)
        self.need = 0
        if not self.greeted:
            if end < GREETING_SIZE:
                if data[:1] and data[0] != 0xFF:
                    raise ZmtpError("not a ZMTP peer")
                return 0
            if data[0] != 0xFF or data[9] != 0x7F or data[10] < 3:
                raise ZmtpError("the peer does not speak ZMTP 3")
            if data[12:32].rstrip(b"\0") != b"NULL":
                raise ZmtpError("the peer asks for a security mechanism other than NULL")
            self.greeted, pos = True, GREETING_SIZE
        parts, inbox = self.parts, self.inbox
        while pos < end:
            flags = data[pos]
            if flags & LONG:
                if end - pos < 9:
                    break
                size = int.from_bytes(data[pos + 1:pos + 9], "big")
                start = pos + 9
            else:
                if end - pos < 2:
                    break
                size = data[pos + 1]
                start = pos + 2
            if end - start < size:
                self.need = start + size - pos
                break
            body = data[start:start + size]
            pos = start + size
            if flags & COMMAND:
                self._command(body)
            elif not self.ready:
                raise ZmtpError("a message came before the handshake")
            else:
                parts.append(body)
                if not flags & MORE:
                    inbox.append(parts)
                    parts = self.parts = []
        return pos

    def _command(self, body: bytes) -> None:
        name, props = parse_command(body)
        if name == b"READY":
            kind = props.get(b"socket-type", b"")
            if kind not in PEERS[self.kind]:
                raise ZmtpError(f"a {self.kind.decode()} cannot talk to a {kind.decode()!r}")
            if not self.ready:
                self._handshaken()
        elif name == b"ERROR":
            raise ZmtpError(f"the peer refused: {body[7:].decode(errors='replace')}")
        # other commands (PING needs ZMTP 3.1, which this end does not announce) are ignored

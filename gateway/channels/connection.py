"""The WebSocket adapter: one client's socket, written without blocking the pump and read by it.

The pump (gateway/channels/pump.py) polls the client's socket itself: :meth:`Connection.read`
parses what came (gateway/framing.py for clients without extensions, wsproto for the others)
and answers pings and closes; :meth:`Connection.send_many` frames what goes out and writes it as
far as the socket takes it, keeping the rest in ``pending`` for the pump's next POLLOUT. What
this needs of simple-websocket's internals is in gateway/channels/simple_ws.py.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from simple_websocket import ConnectionClosed
from wsproto.events import Message, Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from .. import framing, tls, wire
from . import simple_ws
from .hooks import WsStats

log = logging.getLogger(__name__)
BLOCK_SECONDS = 30.0  # a parked client that takes nothing for this long is closed


class ClientSocket:
    """Stands in for the client's socket inside simple-websocket, whose own writes (pongs, the
    close handshake) must queue behind what the pump has pending, never cut into a frame."""

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        self._conn, self._sock = conn, sock

    def send(self, data: bytes) -> int:
        self._conn._write(data)
        return len(data)

    sendall = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Connection:
    """One client WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.protocol = ws.subprotocol if ws.subprotocol == wire.V1 else None
        self.closed = False
        self.evicted = False
        self.next_ping = 0.0
        self._lock = threading.RLock()
        self.stats = WsStats()  # written only by the pump thread
        # no extension: frames are written and read here (gateway/framing.py)
        self.plain = simple_ws.no_extensions(ws)
        cap = getattr(ws, "max_message_size", None) or framing.MAX_MESSAGE_SIZE
        self.reader = framing.FrameReader(cap) if self.plain else None
        self.pending: list[bytes | memoryview] = []  # written when the socket takes them
        self.on_flushed: list[Callable[[], None]] = []  # run when ``pending`` is all written
        self.sock: socket.socket = tls.for_pump(simple_ws.client_socket(ws))
        self.sock.setblocking(False)
        simple_ws.replace_socket(ws, ClientSocket(self, self.sock))

    def send(self, frame: wire.Frame, block: bool = False) -> None:
        self.send_many([frame], block=block)

    def send_many(self, frames: list[wire.Frame], done: Callable[[], None] | None = None,
                  block: bool = False) -> None:
        """Send frames (from wire.to_client) in order, in as few socket writes as the kernel
        allows.

        The socket does not block: what it does not take now waits in ``pending`` for the
        pump (polling for POLLOUT) while the pump goes on reading the kernel, so a slow client
        never makes the kernel's high-water mark drop output. ``done`` runs once the frames
        are all written; ``block`` waits for that (for a connection another thread pumps)."""
        ws = self.ws
        with self._lock:
            if not ws.connected:
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            parts = self.pending
            for frame in frames:
                if self.plain:
                    parts.append(framing.ws_header(frame.size, frame.text))
                    parts += frame.pieces
                else:  # wsproto frames str as text, bytes as binary
                    data = bytes(frame)
                    message = Message(data=data.decode()) if frame.text else Message(data=data)
                    parts.append(simple_ws.encode(ws, message))
            if done is not None:
                self.on_flushed.append(done)
            if not self._flush_locked() and block:
                self._drain_locked(BLOCK_SECONDS)
                if self.pending:  # the client reads nothing: let it go
                    log.info("WebSocket: a client read nothing for %ss; closing it",
                             BLOCK_SECONDS)
                    self.closed = True
                    self.abort()

    def _write(self, data: bytes) -> None:
        """A control frame: after what is pending, at once if the socket takes it."""
        with self._lock:
            self.pending.append(data)
            self._flush_locked()

    def flush(self) -> None:
        """Write what is pending as far as the socket takes it (the pump saw POLLOUT)."""
        with self._lock:
            self._flush_locked()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for what is pending to go out (before closing)."""
        try:
            with self._lock:
                self._drain_locked(timeout)
        except OSError:  # the client went meanwhile
            self.closed = True

    def _drain_locked(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fileno(), select.POLLOUT)
        while not self._flush_locked():
            left = (end - time.monotonic()) * 1000
            if left <= 0:
                return
            poller.poll(left)
            if self.closed:  # another thread ended the connection meanwhile
                return

    def _flush_locked(self) -> bool:
        """Write pending bytes until the socket would block; True when none are left."""
        if not framing.send_some(self.sock, self.pending):
            return False
        if self.on_flushed:
            done, self.on_flushed = self.on_flushed, []
            for fn in done:
                fn()
        return True

    def fileno(self) -> int:
        return int(self.sock.fileno())

    def read(self) -> list[str | bytes]:
        """Read what the client sent (the socket is readable) and return the complete frames.

        Does what simple-websocket's reader thread would: wsproto parses, pings and close
        frames are answered. Sets ``closed`` when the client went away."""
        ws = self.ws
        try:
            data = self.sock.recv(ws.receive_bytes)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            ws.connected = False
            return []
        if self.reader is not None:
            return self._read_plain(data)
        try:
            with self._lock:
                simple_ws.feed(ws, data)
        except (LocalProtocolError, OSError):
            ws.connected = False
        messages = simple_ws.take_messages(ws)
        if not ws.connected:
            self.closed = True
        return messages

    def _read_plain(self, data: bytes) -> list[str | bytes]:
        """read() for a client without extensions: framing.FrameReader parses, and pings and
        closes are answered as simple-websocket would."""
        ws, reader = self.ws, self.reader
        assert reader is not None
        messages, replies = reader.feed(data)
        if reader.pong:
            reader.pong = False
            ws.pong_received = True
        try:
            for reply in replies:
                self._write(reply)
        except OSError:
            reader.close_code = reader.close_code or 1006
        if reader.close_code is not None:
            if reader.close_code in (framing.PROTOCOL_ERROR, framing.INVALID_DATA,
                                     framing.MESSAGE_TOO_BIG):
                log.info("WebSocket: closing a client that broke the protocol: %s",
                         reader.close_reason)
            ws.close_reason, ws.close_message = reader.close_code, reader.close_reason
            ws.connected = False
            self.closed = True
        return messages

    def ping(self, now: float) -> None:
        """Ping the client every ``ping_interval``; close it if the last ping got no pong."""
        ws = self.ws
        if not ws.ping_interval or now < self.next_ping or self.closed or not ws.connected:
            return
        if self.next_ping and not ws.pong_received:
            log.info("WebSocket: no pong within %ss; closing it", ws.ping_interval)
            try:
                ws.close(reason=CloseReason.POLICY_VIOLATION, message="Ping/Pong timeout")
            except Exception:
                pass
            self.closed = True
            return
        ws.pong_received = False
        try:
            self._write(framing.control_frame(framing.OP_PING) if self.plain
                        else simple_ws.encode(ws, Ping()))
        except (LocalProtocolError, OSError):  # the client is closing the connection
            self.closed = True
        self.next_ping = now + ws.ping_interval

    def abort(self) -> None:
        """End the connection from another thread: its pump sees the socket close."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

"""WebSocket framing (RFC 6455) done here, for clients that negotiated no extension.

Python clients (Jupyter Server's gateway client, websocket-client, aiohttp) ask for none, and
on that path wsproto's event machinery was a fifth of the gateway's CPU per message each way.
Clients with permessage-deflate (offered by browsers and the websockets library, accepted only
with ``ws_compression: true``) keep wsproto for both directions.
"""
from __future__ import annotations

import socket
import struct

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009
#: The largest message a client may send (Jupyter Server's tornado takes 10 MiB by default):
#: a bound on what one connection can make the gateway hold.
MAX_MESSAGE = 64 << 20


def ws_header(data: bytes, text: bool) -> bytes:
    """A server's (unmasked, final) WebSocket frame header for ``data`` (RFC 6455, 5.2)."""
    op = 0x81 if text else 0x82
    n = len(data)
    if n < 126:
        return bytes((op, n))
    if n < 65536:
        return struct.pack("!BBH", op, 126, n)
    return struct.pack("!BBQ", op, 127, n)


def control_frame(op: int, payload: bytes = b"") -> bytes:
    """A server's close, ping or pong frame (payload of at most 125 bytes)."""
    return bytes((0x80 | op, len(payload))) + payload[:125]


def close_frame(code: int, reason: str = "") -> bytes:
    return control_frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])


def send_some(sock: socket.socket, parts: list[bytes | memoryview]) -> bool:
    """Write ``parts`` to a non-blocking socket until it would block, removing what went out
    (a part cut short stays as the rest of it); True when nothing is left."""
    while parts:
        try:
            sent = sock.sendmsg(parts[:512])
        except (BlockingIOError, InterruptedError):
            return False
        i = 0
        while sent:
            first = len(parts[i])
            if sent >= first:
                sent -= first
                i += 1
            else:
                parts[i] = memoryview(parts[i])[sent:]
                sent = 0
        del parts[:i]  # one deletion per write: a long backlog is not shifted part by part
        while parts and not len(parts[0]):
            del parts[0]
    return True


def unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (one big-integer XOR, done in C)."""
    n = len(data)
    if not n:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class ProtocolError(ValueError):
    """The client broke RFC 6455: the connection is closed with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class FrameReader:
    """Client frames → messages: masked frames, fragments, control frames between them.

    :meth:`feed` takes what the socket gave and returns ``(messages, replies)``: complete
    messages (str for text, bytes for binary) and what ``Ping`` and ``Close`` ask to be sent
    back. ``pong`` is set when a pong came, ``close_code`` (and ``close_reason``) when the
    client closed, or broke the protocol (:class:`ProtocolError`: what RFC 6455 says fails the
    connection; the messages before it are still returned, and the reply is a close frame).
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self.buf = bytearray()
        self.fragments: tuple[int, bytearray] | None = None  # opcode, data so far
        self.pong = False
        self.close_code: int | None = None
        self.close_reason = ""

    def feed(self, data: bytes) -> tuple[list[str | bytes], list[bytes]]:
        buf = self.buf
        buf += data
        messages: list[str | bytes] = []
        replies: list[bytes] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2 and self.close_code is None:
                b0, b1 = buf[pos], buf[pos + 1]
                length, head = b1 & 0x7F, 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                if b0 & 0x70:
                    raise ProtocolError(PROTOCOL_ERROR, "reserved bits set without an extension")
                if not b1 & 0x80:
                    raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
                so_far = len(self.fragments[1]) if self.fragments and not b0 & 0x0F else 0
                if length + so_far > self.max_message:  # before its bytes are waited for
                    raise ProtocolError(MESSAGE_TOO_BIG, f"a message over {self.max_message} "
                                                         f"bytes")
                start = pos + head + 4
                if end - start < length:
                    break
                payload = unmask(buf[start:start + length], buf[pos + head:start])
                pos = start + length
                self._frame(b0 & 0x80, b0 & 0x0F, payload, messages, replies)
        except ProtocolError as exc:
            self.close_code, self.close_reason = exc.code, str(exc)
            replies.append(close_frame(exc.code, str(exc)))
        finally:
            del buf[:pos]
        return messages, replies

    def _frame(self, fin: int, op: int, payload: bytes, messages: list[str | bytes],
               replies: list[bytes]) -> None:
        if op >= OP_CLOSE:
            if not fin or len(payload) > 125:
                raise ProtocolError(PROTOCOL_ERROR, "a control frame must be whole and short")
            if op == OP_CLOSE:
                if len(payload) == 1:
                    raise ProtocolError(PROTOCOL_ERROR, "a close frame's code takes 2 bytes")
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                self.close_reason = payload[2:].decode(errors="replace")
                replies.append(close_frame(self.close_code) if payload else
                               control_frame(OP_CLOSE))
            elif op == OP_PING:
                replies.append(control_frame(OP_PONG, payload))
            elif op == OP_PONG:
                self.pong = True
            else:
                raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {op}")
            return
        if op == OP_CONT:
            if self.fragments is None:
                raise ProtocolError(PROTOCOL_ERROR, "a continuation frame with nothing to continue")
            self.fragments[1].extend(payload)
            if not fin:
                return
            op, data = self.fragments[0], bytes(self.fragments[1])
            self.fragments = None
        elif op in (OP_TEXT, OP_BINARY):
            if self.fragments is not None:
                raise ProtocolError(PROTOCOL_ERROR, "a new message inside a fragmented one")
            if not fin:
                self.fragments = (op, bytearray(payload))
                return
            data = payload
        else:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {op}")
        if op == OP_TEXT:
            try:
                messages.append(data.decode())
            except UnicodeDecodeError:
                raise ProtocolError(INVALID_DATA, "a text message that is not UTF-8") from None
        else:
            messages.append(data)

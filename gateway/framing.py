"""WebSocket framing (RFC 6455) done here, for clients that negotiated no extension.

Python clients (Jupyter Server's gateway client, websocket-client, aiohttp) ask for none, and
on that path wsproto's event machinery was a fifth of the gateway's CPU per message each way.
Clients with permessage-deflate (offered by browsers and the websockets library, accepted only
with ``ws_compression: true``) keep wsproto for both directions.

The module's rule: no I/O here (gateway/sockio.py writes to sockets). :class:`FrameReader` is
bytes in, messages and replies out, with bounded memory, and reads every byte sequence as
wsproto's server does (tests/gateway/test_framing_reference.py), but for its size cap.
"""
from __future__ import annotations

import codecs
import struct

from .sockio import send_some as send_some  # channels/connection.py writes with framing.send_some

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
NO_STATUS, PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1005, 1002, 1007, 1009
MAX_MESSAGE_SIZE = 64 << 20  # FrameReader's default: see its docstring


def ws_header(n: int, text: bool) -> bytes:
    """A server's (unmasked, final) WebSocket frame header for ``n`` bytes (RFC 6455, 5.2)."""
    op = 0x81 if text else 0x82
    if n < 126:
        return bytes((op, n))
    if n < 65536:
        return struct.pack("!BBH", op, 126, n)
    return struct.pack("!BBQ", op, 127, n)


def control_frame(op: int, payload: bytes = b"") -> bytes:
    """A server's close, ping or pong frame (the payload cut to 125 bytes, as RFC 6455 asks)."""
    payload = payload[:125]
    return bytes((0x80 | op, len(payload))) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A server's close frame (the reason cut to fit, at a character boundary)."""
    cut = reason.encode()[:123].decode(errors="ignore").encode()  # no character cut in two
    return control_frame(OP_CLOSE, code.to_bytes(2, "big") + cut)


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


def valid_close_code(code: int) -> bool:
    """Whether a client may send ``code`` in a close frame (RFC 6455, 7.4).

    1004-1006 and 1015 are reserved or only for local use, 1014 and up to 2999 are reserved
    for future RFCs, 1012 and 1013 are registered with IANA; wsproto draws the same lines."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1013 or 3000 <= code <= 4999


class FrameReader:
    """Client frames → messages: masked frames, fragments, control frames between them.

    :meth:`feed` takes what the socket gave and returns ``(messages, replies)``: complete
    messages (str for text, bytes for binary) and what ``Ping`` and ``Close`` ask to be sent
    back. ``pong`` is set when a pong came, ``close_code`` (and ``close_reason``) when the
    client closed, or broke the protocol (:class:`ProtocolError`: what RFC 6455 says fails the
    connection; the messages before it are still returned, and the reply is a close frame).
    Once ``close_code`` is set, what is fed is dropped.

    Memory is bounded: a message (all its fragments) longer than ``max_message_size`` bytes
    fails the connection with 1009 as soon as a frame header announces it, so the reader never
    holds more than that plus one ``feed``'s data. The default, 64 MiB, is six times the 10 MiB
    Jupyter Server's WebSocket (tornado's default) takes from a client.
    """

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self.buf = bytearray()
        # The fragmented message being received: its opcode (OP_CONT while there is none), its
        # size so far and its frames (a text's decoded frame by frame, as wsproto does).
        self.fragments_op = OP_CONT
        self.fragments_size = 0
        self.fragments: list[bytes] = []
        self.texts: list[str] = []
        self.decoder: codecs.IncrementalDecoder | None = None
        self.pong = False
        self.close_code: int | None = None
        self.close_reason = ""

    def feed(self, data: bytes) -> tuple[list[str | bytes], list[bytes]]:
        messages: list[str | bytes] = []
        replies: list[bytes] = []
        if self.close_code is not None:
            return messages, replies
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        whole = self.fragments_op == OP_CONT  # no fragmented message is being received
        room = self.max_message_size - self.fragments_size  # bytes its next frame may take
        try:
            while end - pos >= 2 and self.close_code is None:
                b0, b1 = buf[pos], buf[pos + 1]
                op, length, head = b0 & 0x0F, b1 & 0x7F, 2
                if b0 & 0x70:
                    raise ProtocolError(PROTOCOL_ERROR, "reserved bits set without an extension")
                if not b1 & 0x80:
                    raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
                if op >= OP_CLOSE:
                    if op > OP_PONG:
                        raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {op}")
                    if not b0 & 0x80 or length > 125:
                        raise ProtocolError(PROTOCOL_ERROR,
                                            "a control frame must be whole and short")
                else:
                    if op > OP_BINARY:
                        raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {op}")
                    if length >= 126:
                        length, head = self._long_length(buf, pos, end, length)
                        if not head:
                            break
                    if length > room:
                        raise ProtocolError(MESSAGE_TOO_BIG, f"a message over "
                                            f"{self.max_message_size} bytes")
                start = pos + head + 4
                if end - start < length:
                    break
                payload = unmask(buf[start:start + length], buf[pos + head:start])
                pos = start + length
                if op >= OP_CLOSE:
                    self._control(op, payload, replies)
                elif whole and op and b0 & 0x80:  # a message in one frame: the common case
                    if op == OP_BINARY:
                        messages.append(payload)
                    else:
                        try:
                            messages.append(payload.decode())
                        except UnicodeDecodeError:
                            raise ProtocolError(INVALID_DATA,
                                                "a text message that is not UTF-8") from None
                else:
                    self._data(b0 & 0x80, op, payload, messages)
                    whole = self.fragments_op == OP_CONT
                    room = self.max_message_size - self.fragments_size
        except ProtocolError as exc:
            self.close_code, self.close_reason = exc.code, str(exc)
            replies.append(close_frame(exc.code, str(exc)))
        if self.close_code is not None:
            buf.clear()  # nothing after a close is read
            self._reset()
        else:
            del buf[:pos]
        return messages, replies

    @staticmethod
    def _long_length(buf: bytearray, pos: int, end: int, short: int) -> tuple[int, int]:
        """(length, header size) of a frame with a 2- or 8-byte length; (0, 0) until whole."""
        if short == 126:
            if end - pos < 4:
                return 0, 0
            length = int.from_bytes(buf[pos + 2:pos + 4], "big")
            if length < 126:
                raise ProtocolError(PROTOCOL_ERROR, "a length in 2 bytes that fits in 1")
            return length, 4
        if end - pos < 10:
            return 0, 0
        length = int.from_bytes(buf[pos + 2:pos + 10], "big")
        if length >> 63:
            raise ProtocolError(PROTOCOL_ERROR, "a length with its reserved top bit set")
        if length < 65536:
            raise ProtocolError(PROTOCOL_ERROR, "a length in 8 bytes that fits in 2")
        return length, 10

    def _control(self, op: int, payload: bytes, replies: list[bytes]) -> None:
        if op == OP_PING:
            replies.append(control_frame(OP_PONG, payload))
        elif op == OP_PONG:
            self.pong = True
        else:
            code, reason = parse_close(payload)
            replies.append(close_frame(code) if payload else control_frame(OP_CLOSE))
            self.close_code, self.close_reason = code, reason

    def _data(self, fin: int, op: int, payload: bytes, messages: list[str | bytes]) -> None:
        """A frame of a fragmented message, or a data frame breaking the rules (feed takes a
        whole message in one frame itself)."""
        if op != OP_CONT:
            if self.fragments_op != OP_CONT:
                raise ProtocolError(PROTOCOL_ERROR, "a new message inside a fragmented one")
            self.fragments_op = op
            self.decoder = _utf8() if op == OP_TEXT else None
        elif self.fragments_op == OP_CONT:
            raise ProtocolError(PROTOCOL_ERROR, "a continuation frame with nothing to continue")
        self.fragments_size += len(payload)
        if self.decoder is not None:  # checked frame by frame, as wsproto does
            try:
                self.texts.append(self.decoder.decode(payload, bool(fin)))
            except UnicodeDecodeError:
                raise ProtocolError(INVALID_DATA, "a text message that is not UTF-8") from None
        else:
            self.fragments.append(payload)
        if fin:
            messages.append("".join(self.texts) if self.decoder is not None
                            else b"".join(self.fragments))
            self._reset()

    def _reset(self) -> None:
        self.fragments_op, self.fragments_size, self.decoder = OP_CONT, 0, None
        self.fragments, self.texts = [], []


def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")()


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a client's close frame's payload; 1005 when it has none."""
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "a close frame's code takes 2 bytes")
    code = int.from_bytes(payload[:2], "big")
    if not valid_close_code(code):
        raise ProtocolError(PROTOCOL_ERROR, f"close code {code} is not one a client may send")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_DATA, "a close reason that is not UTF-8") from None

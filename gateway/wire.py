"""Pure conversions between WebSocket frames and Jupyter wire messages.

Two protocols, as Jupyter Server speaks them:

* legacy (no subprotocol): one JSON text frame per message with a ``channel`` key; a message
  with buffers is a binary frame: ``nbufs`` and offsets as big-endian uint32, then the JSON and
  the buffers.
* ``v1.kernel.websocket.jupyter.org``: every frame binary: little-endian uint64 offsets, the
  channel name, then the raw header, parent, metadata, content and buffers.

Relaying kernel → client keeps the JSON parts as bytes and splices them, so content is never
decoded and encoded again, nor, when long, copied (:class:`Frame`); only the small header is
read (for msg_id and msg_type).
"""
from __future__ import annotations

import json
import logging
import struct
from typing import Any

from ..workers.jmsg import pack

log = logging.getLogger(__name__)
V1 = "v1.kernel.websocket.jupyter.org"
CHANNELS = frozenset({"shell", "iopub", "stdin", "control"})


class BadFrame(ValueError):
    """A client frame we cannot turn into a message."""


# A message whose parts are shorter than this is written as one piece (joined: cheap), so a
# socket write of many small messages stays a short list; a longer one is written from its
# parts as they came from the kernel, never copied into one more buffer of megabytes.
JOIN_UNDER = 64 << 10


class Frame:
    """One WebSocket message for the client: the pieces its payload is written from, in order
    (the connection writes them with its header in one ``sendmsg``), and whether it is a text
    frame (else binary). ``len()`` is the payload's size, ``bytes()`` the payload."""

    __slots__ = ("pieces", "text", "size")

    def __init__(self, pieces: tuple[bytes, ...], text: bool) -> None:
        self.pieces, self.text = pieces, text
        self.size = sum(map(len, pieces))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


def _utf8(piece: bytes) -> bytes:
    """``piece`` as UTF-8, with what is not (a kernel may send lone surrogates) replaced by
    U+FFFD, as decoding it to str would."""
    if not piece.isascii():
        try:
            piece.decode()
        except UnicodeDecodeError:
            return piece.decode("utf-8", errors="replace").encode()
    return piece


def json_part(part: bytes) -> dict[str, Any]:
    """One JSON part of a message (header, parent...) as a dict; {} if it is not one."""
    try:  # UTF-8, as the wire protocol says (json.loads would first guess the encoding)
        value = json.loads(part.decode())
    except ValueError:  # UnicodeDecodeError included
        return {}
    return value if isinstance(value, dict) else {}


def header_of(parts: list[bytes]) -> dict[str, Any]:
    return json_part(parts[0])


def to_client(channel: str, parts: list[bytes], buffers: list[bytes],
              protocol: str | None, head: dict[str, Any] | None = None) -> Frame:
    """A kernel message (raw JSON parts) as one WebSocket frame for the client. The parts are
    spliced as they are: content is never decoded and encoded again, and a long one is not
    copied at all (see :class:`Frame`)."""
    if protocol == V1:
        return _frame(v1_pieces(channel, parts + buffers), text=False)
    h, p, m, c = parts
    if head is None:
        head = header_of(parts)
    body = (b'{"header":', h, b',"msg_id":', pack(head.get("msg_id", "")),
            b',"msg_type":', pack(head.get("msg_type", "")), b',"parent_header":', p,
            b',"metadata":', m, b',"content":', c, b',"buffers":[],"channel":',
            pack(channel), b"}")
    if buffers:
        return _frame(binary_legacy_pieces(body, buffers), text=False)
    if len(c) < JOIN_UNDER:  # most messages: one piece, checked at once
        return Frame((_utf8(b"".join(body)),), text=True)
    return Frame(tuple(_utf8(piece) for piece in body), text=True)


def _frame(pieces: tuple[bytes, ...], text: bool) -> Frame:
    """A Frame of ``pieces``, joined into one when the whole is short (see JOIN_UNDER)."""
    if sum(map(len, pieces)) < JOIN_UNDER:
        pieces = (b"".join(pieces),)
    return Frame(pieces, text)


def binary_legacy_pieces(body: tuple[bytes, ...], buffers: list[bytes]) -> tuple[bytes, ...]:
    """Jupyter Server's ``serialize_binary_message``: offsets, the JSON (``body``, in
    pieces), then the buffers."""
    sizes = [sum(map(len, body)), *map(len, buffers)]
    nbufs = len(sizes)
    offsets = [4 * (nbufs + 1)]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    return (struct.pack("!" + "I" * (nbufs + 1), nbufs, *offsets), *body, *buffers)


def binary_legacy(body: bytes, buffers: list[bytes]) -> bytes:
    """A legacy binary frame's payload in one piece (as a client sends it)."""
    return b"".join(binary_legacy_pieces((body,), buffers))


def v1_pieces(channel: str, msg_list: list[bytes]) -> tuple[bytes, ...]:
    """Jupyter Server's ``serialize_msg_to_ws_v1``, in pieces."""
    ch = channel.encode()
    offsets = [8 * (1 + 1 + len(msg_list) + 1)]
    offsets.append(len(ch) + offsets[-1])
    for part in msg_list:
        offsets.append(len(part) + offsets[-1])
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return (head, ch, *msg_list)


def to_v1(channel: str, msg_list: list[bytes]) -> bytes:
    """A v1 frame's payload in one piece (as a client sends it)."""
    return b"".join(v1_pieces(channel, msg_list))


def from_client(frame: str | bytes, protocol: str | None) -> tuple[str, list[bytes], list[bytes]]:
    """A client frame → (channel, [header, parent, metadata, content] as JSON bytes, buffers)."""
    try:
        if protocol == V1:
            if not isinstance(frame, bytes):
                raise BadFrame("the v1 protocol sends binary frames only")
            return _from_v1(frame)
        if isinstance(frame, bytes):
            msg, buffers = _from_binary_legacy(frame)
        else:
            msg, buffers = json.loads(frame), []
    except BadFrame:
        raise
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise BadFrame(f"cannot decode frame: {exc}") from None
    if not isinstance(msg, dict):
        raise BadFrame("a message must be a JSON object")
    channel = msg.get("channel")
    if channel is None:
        # Jupyter Server's GatewayKernelClient (nbclient through GatewayKernelManager) sends
        # no channel; Jupyter Server and Enterprise Gateway route such a message to shell.
        log.debug("No channel specified, assuming shell")
        channel = "shell"
    if not isinstance(channel, str) or channel not in CHANNELS:  # a list is unhashable
        raise BadFrame(f"unknown channel {channel!r}"[:200])
    head = msg.get("header")
    if not isinstance(head, dict) or not head.get("msg_type"):
        raise BadFrame("a message needs a header with msg_type")
    parts = [pack(head), pack(msg.get("parent_header") or {}), pack(msg.get("metadata") or {}),
             pack(msg.get("content") if msg.get("content") is not None else {})]
    return channel, parts, buffers


def _from_binary_legacy(frame: bytes) -> tuple[Any, list[bytes]]:
    nbufs = struct.unpack("!i", frame[:4])[0]
    if not 0 < nbufs < 10000:
        raise BadFrame("bad buffer count")
    offsets = list(struct.unpack("!" + "I" * nbufs, frame[4:4 * (nbufs + 1)]))
    bounds = offsets + [len(frame)]
    bufs = [frame[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return json.loads(bufs[0].decode()), bufs[1:]


def _from_v1(frame: bytes) -> tuple[str, list[bytes], list[bytes]]:
    n = int.from_bytes(frame[:8], "little")
    if not 3 <= n < 10000:
        raise BadFrame("bad offset count")
    offsets = [int.from_bytes(frame[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
    channel = frame[offsets[0]:offsets[1]].decode()
    if channel not in CHANNELS:
        raise BadFrame(f"unknown channel {channel!r}")
    parts = [frame[offsets[i]:offsets[i + 1]] for i in range(1, n - 1)]
    if len(parts) < 4:
        raise BadFrame("a message needs header, parent, metadata and content")
    try:
        head = json.loads(parts[0])
    except ValueError:
        raise BadFrame("the header is not JSON") from None
    if not isinstance(head, dict) or not head.get("msg_type"):
        raise BadFrame("a message needs a header with msg_type")
    return channel, parts[:4], parts[4:]


def status_message(state: str, session: str, parent: dict[str, Any] | None = None
                   ) -> tuple[list[bytes], list[bytes]]:
    """A status message the gateway makes up (restarting, idle after restart, dead)."""
    from ..workers.jmsg import header

    return [pack(header("status", session)), pack(parent or {}), b"{}",
            pack({"execution_state": state})], []

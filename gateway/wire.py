"""Pure conversions between WebSocket frames and Jupyter wire messages.

Two protocols, as Jupyter Server speaks them:

* legacy (no subprotocol): one JSON text frame per message with a ``channel`` key; a message
  with buffers is a binary frame: ``nbufs`` and offsets as big-endian uint32, then the JSON and
  the buffers.
* ``v1.kernel.websocket.jupyter.org``: every frame binary: little-endian uint64 offsets, the
  channel name, then the raw header, parent, metadata, content and buffers.

Relaying kernel → client keeps the JSON parts as bytes and splices them, so content is never
decoded and encoded again; only the small header is read (for msg_id and msg_type).
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


class Text(bytes):
    """A legacy-protocol message for a WebSocket text frame, kept as its UTF-8 bytes: a frame
    of megabytes of output is not decoded to str and encoded back to be sent."""

    __slots__ = ()


def text(body: bytes) -> Text:
    """``body`` as a text frame's payload: UTF-8, with what is not (a kernel may send lone
    surrogates) replaced by U+FFFD, as decoding it to str would."""
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            body = body.decode("utf-8", errors="replace").encode()
    return Text(body)


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
              protocol: str | None, head: dict[str, Any] | None = None) -> bytes:
    """A kernel message (raw JSON parts) as one WebSocket frame for the client: :class:`Text`
    for a text frame, else bytes for a binary one. The content is copied once (join)."""
    if protocol == V1:
        return to_v1(channel, parts + buffers)
    h, p, m, c = parts
    if head is None:
        head = header_of(parts)
    body = b"".join((b'{"header":', h, b',"msg_id":', pack(head.get("msg_id", "")),
                     b',"msg_type":', pack(head.get("msg_type", "")), b',"parent_header":', p,
                     b',"metadata":', m, b',"content":', c, b',"buffers":[],"channel":',
                     pack(channel), b"}"))
    if not buffers:
        return text(body)
    return binary_legacy(body, buffers)


def binary_legacy(body: bytes, buffers: list[bytes]) -> bytes:
    """Jupyter Server's ``serialize_binary_message``: offsets, JSON, then buffers."""
    bufs = [body, *buffers]
    nbufs = len(bufs)
    offsets = [4 * (nbufs + 1)]
    for b in bufs[:-1]:
        offsets.append(offsets[-1] + len(b))
    return b"".join((struct.pack("!" + "I" * (nbufs + 1), nbufs, *offsets), *bufs))


def to_v1(channel: str, msg_list: list[bytes]) -> bytes:
    """Jupyter Server's ``serialize_msg_to_ws_v1``."""
    ch = channel.encode()
    offsets = [8 * (1 + 1 + len(msg_list) + 1)]
    offsets.append(len(ch) + offsets[-1])
    for part in msg_list:
        offsets.append(len(part) + offsets[-1])
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return b"".join((head, ch, *msg_list))


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

"""Jupyter wire messages, minimal and pure: build, sign and split the ZMQ frames.

Shared by the gateway (WebSocket bridge) and the supervisor. The message parts stay JSON
bytes wherever possible, so relaying a message does not decode and re-encode its content.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar, cast

DELIM = b"<IDS|MSG>"
Frame = TypeVar("Frame", bound="bytes | memoryview")  # a received frame, copied or not
PROTOCOL_VERSION = "5.3"


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


# One encoder for every message: json.dumps with these options builds a new one each call,
# which costs more than encoding a header's msg_id.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def pack(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


class Signer:
    """HMAC signatures as the kernel's connection key and scheme say."""

    def __init__(self, key: str | bytes, scheme: str = "hmac-sha256") -> None:
        self.key = key.encode() if isinstance(key, str) else key
        self.digest = getattr(hashlib, scheme.split("-", 1)[-1])

    def sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        h = hmac.new(self.key, digestmod=self.digest)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()


def header(msg_type: str, session: str, username: str = "poolgate") -> dict[str, Any]:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": username,
        "session": session,
        "date": iso_now(),
        "version": PROTOCOL_VERSION,
    }


def frames(signer: Signer, parts: list[bytes], buffers: list[bytes] | None = None) -> list[bytes]:
    """Wire frames for the four JSON parts (header, parent, metadata, content)."""
    return [DELIM, signer.sign(parts), *parts, *(buffers or [])]


def build(signer: Signer, msg_type: str, content: dict[str, Any], session: str,
          parent: dict[str, Any] | None = None) -> tuple[str, list[bytes]]:
    """A new message; returns its msg_id and frames."""
    h = header(msg_type, session)
    parts = [pack(h), pack(parent or {}), b"{}", pack(content)]
    return h["msg_id"], frames(signer, parts)


def split(msg: list[Frame]) -> tuple[list[Frame], list[Frame]]:
    """(header, parent, metadata, content) and buffers of received frames, identities dropped."""
    i = cast("list[bytes | memoryview]", msg).index(DELIM)  # a memoryview equals the bytes it holds
    return msg[i + 2:i + 6], msg[i + 6:]


def session_id() -> str:
    return os.urandom(16).hex()


def encode_parts(parts: Sequence[bytes | memoryview]) -> bytes:
    """Frames as one blob (count, then length-prefixed parts), for the replay buffer."""
    import struct

    return struct.pack("!I", len(parts)) + b"".join(struct.pack("!I", len(p)) + p for p in parts)


def decode_parts(blob: bytes) -> list[bytes]:
    import struct

    (n,), pos, out = struct.unpack_from("!I", blob), 4, []
    for _ in range(n):
        (size,) = struct.unpack_from("!I", blob, pos)
        out.append(blob[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out

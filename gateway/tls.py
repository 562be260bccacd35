"""The client socket of a WebSocket served over TLS, as the pump (gateway/channels/pump.py) uses it.

The pump writes with ``sendmsg`` and reads a non-blocking socket when ``poll`` says it is
readable. An ``ssl.SSLSocket`` has no ``sendmsg``, says "would block" with ``SSLWantReadError``
and ``SSLWantWriteError`` (not ``BlockingIOError``), and may hold decrypted bytes that ``poll``
cannot see. :class:`TLSClientSocket` gives the pump the plain socket's behaviour; plain sockets
are used as they are (:func:`for_pump`), so the measured hot path is unchanged without TLS.
"""
from __future__ import annotations

import socket
import ssl
from typing import Any

#: Bytes per TLS write: one record's worth; the same prefix is offered again after "would block".
CHUNK = 16384


def for_pump(sock: Any) -> Any:
    """``sock`` itself, or its TLS adapter."""
    return TLSClientSocket(sock) if isinstance(sock, ssl.SSLSocket) else sock


class TLSClientSocket:
    """``sendmsg`` and ``recv`` over an ``ssl.SSLSocket``, with a plain socket's errors."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def sendmsg(self, parts: list[bytes | memoryview]) -> int:
        """Write the first ``CHUNK`` bytes of ``parts``; how many went (all of them, or none)."""
        chunk, size = [], 0
        for part in parts:
            take = memoryview(part)[:CHUNK - size]
            chunk.append(take)
            size += len(take)
            if size >= CHUNK:
                break
        try:
            return int(self._sock.send(b"".join(chunk)))
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError from None

    def recv(self, size: int) -> bytes:
        """What the socket has, including what TLS already decrypted (``poll`` cannot see it)."""
        try:
            data = self._sock.recv(size)
            while data and self._sock.pending():
                data += self._sock.recv(self._sock.pending())
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        except ssl.SSLError:
            return b""  # a broken TLS stream: the client is gone
        return data

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        self._sock.shutdown(how)

    def __getattr__(self, name: str) -> Any:  # fileno, setblocking, close, ...
        return getattr(self._sock, name)

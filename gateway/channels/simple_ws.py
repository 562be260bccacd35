"""The one place that reaches into simple-websocket's (and wsproto's) undocumented internals.

flask-sock hands each route a ``simple_websocket.Server``. The pump (gateway/channels/pump.py)
reads and writes its socket itself, so simple-websocket's reader thread never runs, and the
Connection (gateway/channels/connection.py) does what that thread would, through this module:

* ``thread_class``: :class:`NoReaderThread` stands in for the thread it would start;
* ``ws.sock``: the client's socket, which the Connection replaces with a stand-in so that
  simple-websocket's own writes (pongs, the close handshake) queue behind the pump's;
* ``ws.ws`` (the wsproto connection), ``ws._handle_events()`` and ``ws.input_buffer``: what
  :func:`feed` uses to parse a client's bytes as the reader thread would;
* ``ws.ws.connection._proto.extensions`` (wsproto): whether permessage-deflate was agreed;
* and these plain instance attributes, read and written as the reader thread does:
  ``STATE_ATTRIBUTES``.

VERIFIED names the releases this was checked against; setup.cfg pins the same range, and
tests/gateway/test_simple_ws.py fails with a message naming this module when a release
changes any of it.
"""
from __future__ import annotations

import socket
from typing import Any

from wsproto.events import Event

VERIFIED = "simple-websocket>=1.0,<1.2"  # 1.0.0 and 1.1.0 run tests/gateway/test_simple_ws.py
STATE_ATTRIBUTES = ("sock", "ws", "connected", "close_reason", "close_message", "pong_received",
                    "receive_bytes", "ping_interval", "max_message_size", "subprotocol",
                    "input_buffer")


class NoReaderThread:
    """Given to simple-websocket as its ``thread_class``: the reader thread it would start for
    every connection. Not started: the session's pump reads the socket (Connection.read)."""

    def __init__(self, target: Any = None, **_: Any) -> None:
        self.name = "poolgate-ws"

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass


def no_extensions(ws: Any) -> bool:
    """True if the client negotiated no extension (no permessage-deflate): frames can then be
    written here, without wsproto's per-message work (the gateway accepts compression only
    with ``ws_compression: true``)."""
    try:
        return not any(ext.enabled() for ext in ws.ws.connection._proto.extensions)
    except AttributeError:  # another wsproto: let it frame every message
        return False


def client_socket(ws: Any) -> socket.socket:
    """The client's TCP (or TLS) socket under whatever the web server wrapped it in."""
    sock: socket.socket = getattr(ws.sock, "_sock", ws.sock)
    return sock


def replace_socket(ws: Any, stand_in: Any) -> None:
    """Make simple-websocket write through ``stand_in`` from now on."""
    ws.sock = stand_in


def encode(ws: Any, event: Event) -> bytes:
    """wsproto's bytes for ``event`` (a message, a ping) on this connection."""
    data: bytes = ws.ws.send(event)
    return data


def feed(ws: Any, data: bytes) -> None:
    """Parse ``data`` from the client as simple-websocket's reader thread does: pings and
    closes are answered, ``connected`` is cleared on a close, messages go to the input buffer."""
    ws.ws.receive_data(data)
    ws.connected = ws._handle_events()


def take_messages(ws: Any) -> list[str | bytes]:
    """The complete messages :func:`feed` parsed so far, removed from the input buffer."""
    messages: list[str | bytes]
    messages, ws.input_buffer = ws.input_buffer, []
    return messages

"""What the gateway's WebSocket code is tested against: a real wsproto client and server pair,
and the parts of a simple_websocket.Server that Connection uses."""
from __future__ import annotations

import socket

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate


def client_pair(deflate: bool = False) -> tuple[WSConnection, WSConnection]:
    """An open wsproto client and server; with permessage-deflate if ``deflate``."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(
        host="x", target="/", extensions=[PerMessageDeflate()] if deflate else [])))
    list(server.events())
    client.receive_data(server.send(AcceptConnection(
        extensions=[PerMessageDeflate()] if deflate else [])))
    list(client.events())
    return client, server


class FakeWs:  # what Connection uses of a simple_websocket.Server
    subprotocol = None
    connected = True
    pong_received = False
    close_reason = close_message = None
    receive_bytes = 65536
    ping_interval = None

    def __init__(self, sock: socket.socket, server: WSConnection) -> None:
        self.sock, self.ws = sock, server

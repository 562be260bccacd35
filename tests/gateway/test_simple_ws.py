"""simple-websocket's internals that gateway/channels/simple_ws.py relies on, checked on a real
``simple_websocket.Server`` over a socket pair. A failure here means the installed release
changed them: see the module's docstring, and keep setup.cfg's pin until it is fixed."""
from __future__ import annotations

import configparser
import importlib.metadata
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import simple_websocket
from packaging.requirements import Requirement
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from poolgate.gateway.channels import simple_ws

HINT = ("simple-websocket {version} changed what gateway/channels/simple_ws.py uses ({what}); "
        f"it was verified for {simple_ws.VERIFIED}")


def _fail(what: str) -> str:
    return HINT.format(version=importlib.metadata.version("simple-websocket"), what=what)


def _server(deflate: bool) -> tuple[simple_websocket.Server, socket.socket, WSConnection]:
    """A Server as flask-sock makes one, its client's socket, and the client's wsproto (the
    server's own socket is ``simple_ws.client_socket(ws)``)."""
    ours, theirs = socket.socketpair()
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="x", target="/",
                                  subprotocols=["v1.kernel.websocket.jupyter.org"],
                                  extensions=[PerMessageDeflate()] if deflate else []))
    head = request.decode().split("\r\n")[1:]
    environ: dict[str, object] = {"werkzeug.socket": ours}
    for line in filter(None, head):
        name, _, value = line.partition(": ")
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    if not deflate:
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)  # as the gateway declines it
    ws = simple_websocket.Server(environ, subprotocols=["v1.kernel.websocket.jupyter.org"],
                                 thread_class=simple_ws.NoReaderThread)
    theirs.settimeout(5)
    client.receive_data(theirs.recv(65536))
    assert any(isinstance(e, AcceptConnection) for e in client.events()), _fail("the handshake")
    return ws, theirs, client


Pair = tuple[simple_websocket.Server, socket.socket, WSConnection, bool]


@pytest.fixture(params=[False, True], ids=["plain", "deflate"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    ws, theirs, client = _server(request.param)
    ours = simple_ws.client_socket(ws)
    yield ws, theirs, client, request.param
    theirs.close()
    ours.close()


def test_the_attributes_are_there(pair: Pair) -> None:
    ws = pair[0]
    missing = [a for a in simple_ws.STATE_ATTRIBUTES if not hasattr(ws, a)]
    assert not missing, _fail(f"attributes {missing}")
    assert callable(getattr(ws, "_handle_events", None)), _fail("Base._handle_events")
    assert ws.connected and ws.subprotocol == "v1.kernel.websocket.jupyter.org"


def test_extensions_are_seen(pair: Pair) -> None:
    ws, _, _, deflate = pair
    assert simple_ws.no_extensions(ws) is not deflate, _fail(
        "wsproto's connection._proto.extensions")


def test_the_socket_is_swapped(pair: Pair) -> None:
    ws = pair[0]
    raw = simple_ws.client_socket(ws)
    assert isinstance(raw, socket.socket), _fail("Server.sock")

    class StandIn:
        def __init__(self) -> None:
            self.written = b""

        def send(self, data: bytes) -> int:
            self.written += data
            return len(data)

        sendall = send

    stand_in = StandIn()
    simple_ws.replace_socket(ws, stand_in)
    ws.close(reason=1000, message="bye")  # simple-websocket writes its close frame itself
    assert stand_in.written, _fail("Server.sock as the socket it writes to")


def test_feed_parses_messages_answers_pings_and_sees_the_close(pair: Pair) -> None:
    ws, theirs, client, _ = pair
    data = (client.send(TextMessage("{}")) + client.send(BytesMessage(b"\x00\x01"))
            + client.send(Ping(b"p")))
    simple_ws.feed(ws, data)
    assert simple_ws.take_messages(ws) == ["{}", b"\x00\x01"], _fail("input_buffer")
    assert simple_ws.take_messages(ws) == []
    client.receive_data(theirs.recv(65536))
    assert any(isinstance(e, Pong) for e in client.events()), _fail("_handle_events answering pings")
    assert ws.connected
    simple_ws.feed(ws, client.send(CloseConnection(code=1000)))
    assert not ws.connected and ws.close_reason == 1000, _fail("connected/close_reason")


def test_encode_frames_for_this_connection(pair: Pair) -> None:
    ws, _, client, _ = pair
    client.receive_data(simple_ws.encode(ws, Message(data="hello")))
    got = [e.data for e in client.events() if isinstance(e, TextMessage)]
    assert got == ["hello"], _fail("Server.ws (wsproto)")


def test_the_installed_release_is_the_verified_one_and_setup_cfg_pins_it() -> None:
    verified = Requirement(simple_ws.VERIFIED)
    assert verified.specifier.contains(importlib.metadata.version("simple-websocket")), \
        _fail("the version: run these tests against it, then widen VERIFIED and setup.cfg")
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    pins = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n")
            if line.strip().startswith("simple-websocket")]
    assert [p.specifier for p in pins] == [verified.specifier]
